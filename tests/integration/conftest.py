"""Fixtures of the integration tests: the run's database, private Redis servers, clusters."""

import subprocess
import sys

import pytest

from tests.fixtures.live_server import PROJECT_ROOT, migrate_database, server_environment
from tests.fixtures.redis_server import redis_server  # noqa: F401
from tests.integration.harness import (
    PausableProxy,
    create_database,
    drop_database,
    require_services,
    start_cluster,
)

ADMIN_USER = "it-admin"
ADMIN_PASSWORD = "it-admin-password-1"


@pytest.fixture(scope="session")
def it_database(tmp_path_factory):
    """A PostgreSQL database of this run (``ducke_it_<random>``), migrated, with a superuser."""
    server_url = require_services()
    database = create_database(server_url)
    try:
        base = tmp_path_factory.mktemp("it-migrate")
        env = server_environment(
            base,
            {
                "DATABASE_URL": database.url,
                "DJANGO_SUPERUSER_PASSWORD": ADMIN_PASSWORD,
            },
            0,
        )
        migrate_database(env)
        subprocess.run(
            [
                sys.executable,
                "manage.py",
                "createsuperuser",
                "--noinput",
                "--username",
                ADMIN_USER,
                "--email",
                "it-admin@example.com",
            ],
            cwd=PROJECT_ROOT,
            env=env,
            check=True,
            capture_output=True,
            timeout=60,
        )
        yield database
    finally:
        drop_database(server_url, database)


@pytest.fixture
def budget(it_database):
    """Set the active budget for a test; the fresh-install values come back afterwards."""
    defaults = dict(
        session_cap_usd="5.00",
        session_max_seconds=1800,
        hourly_cap_usd="50.00",
        breaker_threshold_usd="100.00",
        breaker_cooldown_seconds=3600,
        max_concurrent_sessions_per_client=2,
        max_output_tokens_per_response=1000,
    )
    yield it_database.set_budget
    it_database.set_budget(**defaults)
    # And the fresh-install spend limits (ducke.policies).
    it_database.edit_policy(
        "UPDATE quotas_spendlimit SET cap_usd = CASE name WHEN 'client-hour' THEN 10 "
        "WHEN 'client-day' THEN 20 ELSE cap_usd END, enabled = true"
    )


@pytest.fixture
def cluster_factory(it_database, tmp_path_factory):
    """``factory(redis_url, **options)`` starts a cluster (see ``start_cluster``); all stopped."""
    clusters = []

    def factory(redis_url, **options):
        cluster = start_cluster(
            tmp_path_factory.mktemp("cluster"), it_database, redis_url, **options
        )
        clusters.append(cluster)
        return cluster

    yield factory
    for cluster in clusters:
        cluster.stop()


@pytest.fixture
def db_proxy(it_database):
    """A pausable TCP proxy in front of the run's PostgreSQL."""
    proxy = PausableProxy(it_database.host, it_database.port).start()
    yield proxy
    proxy.stop()
