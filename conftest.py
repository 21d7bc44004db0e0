"""Root conftest: registers the shared fixture modules of tests/fixtures/ for every test."""

pytest_plugins = [
    "tests.fixtures.simulator",
    "tests.fixtures.fake_services",
    "tests.fixtures.relay",
    "tests.fixtures.live_server",
    "tests.fixtures.redis_server",
    "tests.fixtures.o200k",
]
