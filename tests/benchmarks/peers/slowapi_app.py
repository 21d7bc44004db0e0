"""The seed's stack as a benchmark peer: FastAPI with slowapi's ``Limiter`` on ``/status``.

Run one process with ``uvicorn tests.benchmarks.peers.slowapi_app:app``. The guard is the
seed's: ``Limiter(key_func=get_remote_address)``, ``@limiter.limit("60/minute")`` on the
route and slowapi's ``_rate_limit_exceeded_handler`` for the 429. ``SLOWAPI_STATUS_LIMIT``
replaces the rate string (the refusal benchmark uses a long window so that no hit is
admitted while it measures); the cost of a refusal does not depend on it.
"""

import os

from fastapi import FastAPI, Request
from slowapi import Limiter, _rate_limit_exceeded_handler
from slowapi.errors import RateLimitExceeded
from slowapi.util import get_remote_address

STATUS_LIMIT = os.environ.get("SLOWAPI_STATUS_LIMIT", "60/minute")

limiter = Limiter(key_func=get_remote_address)
app = FastAPI()
app.state.limiter = limiter
app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)


@app.get("/status")
@limiter.limit(STATUS_LIMIT)
async def status(request: Request):
    """A health answer, as the seed's ``/status`` gave one."""
    return {"status": "ok"}
