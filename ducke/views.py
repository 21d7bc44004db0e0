"""HTTP views: the DUCK-E page and the /status health report."""

from django.db import connection
from django.http import JsonResponse
from django.shortcuts import render

import ducke
from ducke.realtime.client_events import ALLOWED_VOICES
from ducke.realtime.upstream import realtime_backend
from quotas import health


def index(request):
    """The voice page."""
    return render(
        request,
        "ducke/index.html",
        {
            "simulator": realtime_backend() == "simulator",
            "version": ducke.__version__,
            "voices": ALLOWED_VOICES,
        },
    )


def status(request):
    """Health of the database, Redis and the circuit breaker, as JSON."""
    database = "ok"
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except Exception:
        database = "unavailable"
    redis_state = health.redis_status()
    body = {
        "status": "ok" if database == "ok" and redis_state != "unavailable" else "degraded",
        "version": ducke.__version__,
        "database": database,
        "redis": redis_state,
        "circuit_breaker": health.breaker_state(),
        "realtime_backend": realtime_backend(),
    }
    return JsonResponse(body, status=200 if database == "ok" else 503)
