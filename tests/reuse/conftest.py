"""The reuse project runs with ``tests/conftest.py``'s fixtures only (no DUCK-E fixture)."""

import sys

import pytest


@pytest.fixture(scope="session", autouse=True)
def nothing_of_ducke_is_loaded():
    """The whole run must work, and end, without importing DUCK-E."""
    yield
    loaded = sorted(name for name in sys.modules if name == "ducke" or name.startswith("ducke."))
    assert loaded == [], f"the reuse project imported {loaded}"
