"""A bounded load run on two instances: concurrent voice sessions plus HTTP traffic.

Prints instances, sessions held, errors, p99 latencies and the ledger reconciled against the
simulator's own count of responses (run with ``-s`` to see them).
"""

import asyncio
import statistics
import time

import httpx
import pytest

from tests.integration.harness import Session, random_ip

pytestmark = [pytest.mark.redis, pytest.mark.timeout(240)]

SESSIONS = 24
RUN_SECONDS = 45
HTTP_WORKERS = 4


def p99(values):
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


async def talk(session, stop, latencies, failures):
    """Question after question; latency = question sent -> first audio of the answer."""
    while not stop.is_set():
        started = time.monotonic()
        try:
            await session.ask()
            events = await session.until("response.output_audio.delta", 30)
            if not events or events[-1]["type"] != "response.output_audio.delta":
                failures.append(f"closed with {session.close_code}")
                return
            latencies.append(time.monotonic() - started)
            events = await session.until("response.done", 60)
            if not events or events[-1]["type"] != "response.done":
                failures.append(f"closed with {session.close_code}")
                return
        except Exception as exc:
            failures.append(repr(exc))
            return


async def http_worker(servers, stop, latencies, codes):
    async with httpx.AsyncClient(timeout=10) as client:
        number = 0
        while not stop.is_set():
            server = servers[number % len(servers)]
            path = ("/status", "/")[number // len(servers) % 2]
            number += 1
            started = time.monotonic()
            try:
                response = await client.get(
                    f"{server.url}{path}", headers={"X-Forwarded-For": random_ip()}
                )
            except httpx.HTTPError as exc:
                codes.append(repr(exc))
                continue
            latencies.append(time.monotonic() - started)
            codes.append(response.status_code)
            await asyncio.sleep(0.02)


async def test_load_on_two_instances(cluster_factory, redis_server, it_database, budget):
    budget(hourly_cap_usd="1000.00", breaker_threshold_usd="2000.00")
    cluster = cluster_factory(redis_server.url)
    servers = cluster.instances
    opened = time.monotonic()
    sessions = await asyncio.gather(
        *(Session.open(servers[n % len(servers)], timeout=30) for n in range(SESSIONS))
    )
    open_seconds = time.monotonic() - opened
    stop = asyncio.Event()
    audio_latency, http_latency, http_codes, failures = [], [], [], []
    tasks = [asyncio.create_task(talk(s, stop, audio_latency, failures)) for s in sessions]
    tasks += [
        asyncio.create_task(http_worker(servers, stop, http_latency, http_codes))
        for _ in range(HTTP_WORKERS)
    ]
    await asyncio.sleep(RUN_SECONDS)
    held = sum(1 for s in sessions if s.close_code is None)
    stop.set()
    await asyncio.gather(*tasks)
    for session in sessions:
        await session.close()

    clients = [s.client_ip for s in sessions]
    deadline = time.monotonic() + 30
    while True:
        rows = it_database.sessions_of(clients)
        if len(rows) == SESSIONS and all(row[3] is not None for row in rows):
            break
        assert time.monotonic() < deadline, "sessions still open in the ledger"
        await asyncio.sleep(0.2)
    ledger = sorted(it_database.response_ids([row[0] for row in rows]))
    upstream = cluster.simulator_responses()
    finished = sorted(r for r, state in upstream.items() if state in ("completed", "cancelled"))
    http_errors = [c for c in http_codes if not isinstance(c, int) or c >= 400]
    answers = len(audio_latency)
    print(
        f"\nload: {len(servers)} instances, {SESSIONS} sessions opened in {open_seconds:.1f}s, "
        f"{held} held for {RUN_SECONDS}s, {answers} answers "
        f"(first audio p50 {statistics.median(audio_latency) * 1000:.0f} ms, "
        f"p99 {p99(audio_latency) * 1000:.0f} ms), session errors {len(failures)}; "
        f"HTTP {len(http_codes)} requests ({len(http_codes) / RUN_SECONDS:.0f}/s), "
        f"errors {len(http_errors)}, p50 {statistics.median(http_latency) * 1000:.0f} ms, "
        f"p99 {p99(http_latency) * 1000:.0f} ms; ledger {len(ledger)} responses == "
        f"simulator {len(finished)} (completed+cancelled)"
    )
    assert failures == []
    assert held == SESSIONS
    assert http_errors == []
    assert answers >= SESSIONS * 3
    assert ledger == finished
    assert p99(audio_latency) < 5.0
    assert p99(http_latency) < 2.0
