"""What a refusal costs: refused GET /status per second, DUCK-E against its peers (issue 11).

Run with ``make bench``. Starts four servers, one process each, on spare loopback ports:

- DUCK-E under daphne, embedded defaults (in-process counters), on a private SQLite database
  whose ``status`` rule allows 1 hit per hour;
- the same with ``REDIS_URL`` on a private redis-server;
- the seed's stack: FastAPI + slowapi under uvicorn (``peers/slowapi_app.py``), its limit on
  the same 1 hit per hour;
- the floor: a bare ASGI app answering every request 429 under daphne (``peers/bare429.py``).

Each is asked once (the one admitted hit) and then driven by the same wrk load, all from one
client address, in interleaved rounds; every measured answer must be a 429 (a wrk script
counts the status codes). Prints the median refusals per second and the server's CPU time per
refusal, and the ratios DUCK-E / slowapi (target >= 1.5) and DUCK-E / bare daphne (target
>= 0.5). Without wrk the benchmark skips (fails under ``DUCKE_REQUIRE_DEPLOY_TOOLS=1``).

``DUCKE_BENCH_PIN=1`` pins each server to one core and wrk and Redis to the other (taskset).
It is off by default: on a 2-core machine shared with other work, a load generator confined to
one core starves and every server looks slower (measured: bare daphne 980-1,360/s pinned
against 2,200-2,260/s unpinned, in runs minutes apart). The server's CPU time per refusal is
printed as well; it depends less on the machine's other load than requests per second.
Allowed ``/status`` with quotas on vs off is ``test_bench_status_http.py``.
"""

import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.bench_servers import bench_servers, benchmark_environment, daphne, pinned  # noqa: F401
from tests.fixtures.redis_server import redis_server  # noqa: F401

pytestmark = pytest.mark.benchmark

ROOT = Path(__file__).resolve().parents[2]
THREADS = 2
CONNECTIONS = 16
SECONDS_PER_ROUND = 3
ROUNDS = 5

# Every rule that /status matches keeps its production shape; ``status`` admits one hit an
# hour (moving window, refused hits are not counted), so after the first request every
# request is refused for the whole run. slowapi's fixed window gets the same rate.
PREPARE = """
import django
django.setup()
from django.core.management import call_command
call_command("migrate", verbosity=0)
from quotas.models import RateLimitRule
rule = RateLimitRule.objects.get(name="status")
rule.limit = 1
rule.window_seconds = 3600
rule.save()
"""
SLOWAPI_LIMIT = "1/hour"

# Counts the status code of every answer wrk reads, per thread, and prints them at the end.
WRK_SCRIPT = """
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) codes = {} end
function response(status, headers, body) codes[status] = (codes[status] or 0) + 1 end
function done(summary, latency, requests)
  for _, thread in ipairs(threads) do
    for status, count in pairs(thread:get("codes")) do
      io.write(string.format("status %d %d\\n", status, count))
    end
  end
end
"""


def wrk_executable():
    """wrk's path; skip (or fail under DUCKE_REQUIRE_DEPLOY_TOOLS=1) when it is missing."""
    executable = shutil.which("wrk")
    if executable is None:
        problem = "wrk is not installed (Debian: apt-get install wrk)"
        if os.environ.get("DUCKE_REQUIRE_DEPLOY_TOOLS") == "1":
            pytest.fail(f"DUCKE_REQUIRE_DEPLOY_TOOLS=1 but {problem}")
        pytest.skip(problem)
    return executable


def core_layout():
    """(server cores, load cores) for taskset, or (None, None) when not pinning."""
    cores = sorted(os.sched_getaffinity(0))
    if os.environ.get("DUCKE_BENCH_PIN") != "1" or len(cores) < 2 or not shutil.which("taskset"):
        return None, None
    return str(cores[-1]), str(cores[0])


def run_wrk(wrk, script, url, seconds, cores):
    """(requests, requests per second, {status: count}) of one wrk round against ``url``."""
    command = [wrk, f"-t{THREADS}", f"-c{CONNECTIONS}", f"-d{seconds}s", "-s", str(script), url]
    result = subprocess.run(
        pinned(command, cores), capture_output=True, text=True, timeout=seconds + 30, check=True
    )
    out = result.stdout
    errors = re.search(r"Socket errors: (.*)", out)
    assert errors is None, f"wrk socket errors against {url}: {errors.group(1)}"
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    per_second = float(re.search(r"Requests/sec:\s+([0-9.]+)", out).group(1))
    codes = {}
    for status, count in re.findall(r"^status (\d+) (\d+)$", out, re.MULTILINE):
        codes[int(status)] = codes.get(int(status), 0) + int(count)
    return requests, per_second, codes


def test_refused_status_per_second(tmp_path, redis_server, bench_servers, bench_report):
    wrk = wrk_executable()
    server_cores, load_cores = core_layout()
    load_average = os.getloadavg()
    database = tmp_path / "bench.sqlite3"
    env = benchmark_environment(database)
    subprocess.run([sys.executable, "-c", PREPARE], cwd=ROOT, env=env, check=True, timeout=120)
    if load_cores:  # Redis is part of the load side: keep it off the server's core.
        subprocess.run(["taskset", "-pc", load_cores, str(redis_server.process.pid)], check=True)
    script = tmp_path / "codes.lua"
    script.write_text(WRK_SCRIPT)

    uvicorn = [sys.executable, "-m", "uvicorn", "--host", "127.0.0.1", "--port", "{port}"]
    uvicorn += ["--workers", "1", "--no-access-log", "--log-level", "warning"]
    configs = {
        "DUCK-E, embedded": (
            daphne("ducke.asgi:application"),
            {"QUOTAS_ENABLED": "1"},
        ),
        "DUCK-E, REDIS_URL": (
            daphne("ducke.asgi:application"),
            {"QUOTAS_ENABLED": "1", "REDIS_URL": redis_server.url},
        ),
        "FastAPI + slowapi, uvicorn": (
            [*uvicorn, "tests.benchmarks.peers.slowapi_app:app"],
            {"SLOWAPI_STATUS_LIMIT": SLOWAPI_LIMIT},
        ),
        "bare ASGI 429, daphne": (
            daphne("tests.benchmarks.peers.bare429:application"),
            {},
        ),
    }
    servers = {
        name: bench_servers(name, command, {**env, **extra}, server_cores)
        for name, (command, extra) in configs.items()
    }
    first = {name: server.wait_ready() for name, server in servers.items()}
    for server in servers.values():  # warm-up: code paths, connections
        run_wrk(wrk, script, server.url, 1, load_cores)
    rates = {name: [] for name in servers}
    cpu = dict.fromkeys(servers, 0.0)
    requests = dict.fromkeys(servers, 0)
    codes = {name: {} for name in servers}
    for _ in range(ROUNDS):
        for name, server in servers.items():
            cpu_before = server.cpu_seconds()
            done, per_second, round_codes = run_wrk(
                wrk, script, server.url, SECONDS_PER_ROUND, load_cores
            )
            cpu[name] += server.cpu_seconds() - cpu_before
            requests[name] += done
            rates[name].append(per_second)
            for status, count in round_codes.items():
                codes[name][status] = codes[name].get(status, 0) + count
            assert sum(round_codes.values()) == done, (name, done, round_codes)
    alive = {name: server.alive() for name, server in servers.items()}
    log_lines = {name: server.log_lines() for name, server in servers.items()}
    log_heads = {name: server.log_head() for name, server in servers.items()}
    for server in servers.values():
        server.stop()

    assert all(alive.values()), f"a server died during the run: {alive}"
    for name in servers:
        assert set(codes[name]) == {429}, f"{name}: not every measured answer was a 429: {codes}"
    assert first["bare ASGI 429, daphne"] == 429
    assert all(first[name] == 200 for name in servers if name != "bare ASGI 429, daphne"), first

    medians = {name: statistics.median(values) for name, values in rates.items()}
    cpu_us = {name: cpu[name] / requests[name] * 1e6 for name in servers}
    pinning = (
        f"server on CPU {server_cores}, wrk and Redis on CPU {load_cores}"
        if server_cores
        else "not pinned"
    )
    print(
        f"\nRefused GET /status, one process each, wrk -t{THREADS} -c{CONNECTIONS}, {ROUNDS} "
        f"interleaved rounds of {SECONDS_PER_ROUND} s, one client address; {pinning}; "
        f"load average at start {load_average[0]:.2f}"
    )
    print(
        f"  {'server':<28} {'median 429/s':>13} {'CPU µs/429':>11} {'log lines':>10}   rounds 429/s"
    )
    for name, values in rates.items():
        rounds = ", ".join(f"{v:.0f}" for v in values)
        print(
            f"  {name:<28} {medians[name]:>13.0f} {cpu_us[name]:>11.0f} "
            f"{log_lines[name]:>10}   {rounds}"
        )
    for name, head in log_heads.items():
        for line in head:
            print(f"  log of {name}: {line}")
    peer, floor = "FastAPI + slowapi, uvicorn", "bare ASGI 429, daphne"
    print(f"  {'ratios':<28} {'throughput':>13} {'CPU':>11}")
    for name in ("DUCK-E, embedded", "DUCK-E, REDIS_URL"):
        for other, target in ((peer, ">= 1.5"), (floor, ">= 0.5")):
            short = "slowapi" if other == peer else "bare daphne"
            throughput = medians[name] / medians[other]
            by_cpu = cpu_us[other] / cpu_us[name]
            label = f"{name} / {short}"
            print(f"  {label:<28} {throughput:>13.2f} {by_cpu:>11.2f}   (target {target})")
            bench_report(
                f"refused /status 429/s, {name} / {short}",
                medians[name],
                unit="req/s",
                ratio=throughput,
                target=target,
            )
            bench_report(
                f"refused /status CPU, {name} ({short}/DUCK-E)",
                cpu_us[name],
                unit="µs/req",
                ratio=by_cpu,
                target=target,
            )
    for name in (peer, floor):
        bench_report(f"refused /status 429/s, {name}", medians[name], unit="req/s")
