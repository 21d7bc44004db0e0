"""Whole-request cost of rate limiting: GET /status through real daphne, quotas on vs off.

Run with ``make bench``. Starts one daphne per configuration on a spare loopback port (a
private SQLite database with the fresh-install policies, ``status`` and ``default`` limits
raised so that nothing is refused), then drives each with the same client load in
interleaved rounds. Clients arrive through a trusted proxy (127.0.0.1) with one of 1000
X-Forwarded-For addresses, so client-address parsing and per-client counters are as in
production. Prints requests per second and the on/off throughput ratio (target >= 0.9),
on the embedded defaults and with REDIS_URL set (a private redis-server).
"""

import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.fixtures.bench_servers import bench_servers, benchmark_environment, daphne  # noqa: F401
from tests.fixtures.redis_server import redis_server  # noqa: F401

pytestmark = pytest.mark.benchmark

ROOT = Path(__file__).resolve().parents[2]
CONCURRENCY = 8
ROUNDS = 6
SECONDS_PER_ROUND = 1.0
CLIENTS = 1000

PREPARE = """
import django
django.setup()
from django.core.management import call_command
call_command("migrate", verbosity=0)
from quotas.models import RateLimitRule
for rule in RateLimitRule.objects.filter(name__in=["status", "default"]):
    rule.limit = 10**9
    rule.save()
"""


async def drive(url, seconds):
    """(requests, seconds) answered by ``url``/status with CONCURRENCY keep-alive clients."""
    done = 0
    failures = []
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=10.0) as http:
        deadline = time.perf_counter() + seconds

        async def worker(offset):
            nonlocal done
            i = offset
            while time.perf_counter() < deadline:
                forwarded = f"10.2.{i % CLIENTS // 256}.{i % 256}"
                response = await http.get("/status", headers={"X-Forwarded-For": forwarded})
                if response.status_code != 200:
                    failures.append(response.status_code)
                done += 1
                i += CONCURRENCY

        started = time.perf_counter()
        await asyncio.gather(*(worker(n) for n in range(CONCURRENCY)))
        elapsed = time.perf_counter() - started
    assert not failures, f"non-200 answers: {sorted(set(failures))}"
    return done, elapsed


def test_status_throughput_quotas_on_vs_off(tmp_path, redis_server, bench_servers, bench_report):
    database = tmp_path / "bench.sqlite3"
    env = benchmark_environment(database)
    subprocess.run([sys.executable, "-c", PREPARE], cwd=ROOT, env=env, check=True, timeout=120)
    configs = {
        "embedded, quotas off": {"QUOTAS_ENABLED": "0"},
        "embedded, quotas on": {"QUOTAS_ENABLED": "1"},
        "REDIS_URL, quotas off": {"QUOTAS_ENABLED": "0", "REDIS_URL": redis_server.url},
        "REDIS_URL, quotas on": {"QUOTAS_ENABLED": "1", "REDIS_URL": redis_server.url},
    }
    servers = {
        name: bench_servers(name, daphne("ducke.asgi:application"), {**env, **extra})
        for name, extra in configs.items()
    }
    first = {name: server.wait_ready() for name, server in servers.items()}
    assert set(first.values()) == {200}, first
    for server in servers.values():  # warm-up: policy cache, connections, code paths
        asyncio.run(drive(server.base_url, 0.5))
    rates = {name: [] for name in servers}
    cpu = dict.fromkeys(servers, 0.0)
    requests = dict.fromkeys(servers, 0)
    for _ in range(ROUNDS):
        for name, server in servers.items():
            cpu_before = server.cpu_seconds()
            done, elapsed = asyncio.run(drive(server.base_url, SECONDS_PER_ROUND))
            cpu[name] += server.cpu_seconds() - cpu_before
            requests[name] += done
            rates[name].append(done / elapsed)
    for server in servers.values():
        server.stop()
    medians = {name: statistics.median(values) for name, values in rates.items()}
    # Server CPU per request hardly depends on what else runs on the machine, unlike req/s.
    cpu_us = {name: cpu[name] / requests[name] * 1e6 for name in servers}
    print(
        f"\nGET /status through daphne ({CONCURRENCY} keep-alive clients, {ROUNDS} rounds of "
        f"{SECONDS_PER_ROUND:g} s each, {CLIENTS} client addresses via a trusted proxy)"
    )
    print(f"  {'configuration':<26} {'median req/s':>13} {'server CPU µs/req':>18}   rounds req/s")
    for name, values in rates.items():
        rounds = ", ".join(f"{v:.0f}" for v in values)
        print(f"  {name:<26} {medians[name]:>13.0f} {cpu_us[name]:>18.0f}   {rounds}")
    for label in ("embedded", "REDIS_URL"):
        on, off = f"{label}, quotas on", f"{label}, quotas off"
        print(
            f"  {label + ' on/off':<26} {medians[on] / medians[off]:>13.3f} "
            f"{cpu_us[off] / cpu_us[on]:>18.3f}   (throughput ratios; target >= 0.9)"
        )
        bench_report(
            f"GET /status req/s, {label}, quotas on (on/off)",
            medians[on],
            unit="req/s",
            ratio=medians[on] / medians[off],
            target=">= 0.9",
        )
        bench_report(
            f"GET /status CPU, {label} (off/on per request)",
            cpu_us[on],
            unit="µs/req",
            ratio=cpu_us[off] / cpu_us[on],
            target=">= 0.9",
        )
