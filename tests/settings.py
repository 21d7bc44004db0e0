"""Settings for the test suite: the project's settings plus test speed-ups."""

import os

from ducke.settings import *  # noqa: F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
# Separate this run's Redis keys from a running server's and from other test runs.
QUOTAS_KEY_PREFIX = f"quotas-test-{os.getpid()}"
# No background writer for quota events: tests flush them (quotas.events.flush()) themselves.
QUOTAS_EVENT_FLUSH_SECONDS = 0
# No background stale-session sweep: tests run quotas.sweep themselves.
QUOTAS_SPEND_SWEEP_SECONDS = 0
# One ledger thread, as Channels' database hop: tests count its connection checks, and a pool
# would keep connections to the test database open. tests/test_ledger_hop.py tests the pool.
QUOTAS_LEDGER_THREADS = 1
