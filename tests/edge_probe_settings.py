"""DUCK-E's settings plus a request-counting middleware in front (tests/test_edge.py)."""

from ducke.settings import *  # noqa: F403
from ducke.settings import MIDDLEWARE

MIDDLEWARE = ["tests.edge_probe.CountingMiddleware", *MIDDLEWARE]
