"""Hostile clients against one instance: fuzzed frames, oversized frames, forged addresses,
clients that never read. Nothing crashes, /status stays 200, nothing off the allowlist
reaches upstream."""

import asyncio
import json
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as sync_connect

from tests.integration.harness import (
    UPSTREAM_ALLOWED,
    Session,
    random_ip,
    rss_kib,
    status,
    user_text,
)

pytestmark = [pytest.mark.redis, pytest.mark.timeout(240)]

# An address on loopback that is not a trusted proxy (the instances trust 127.0.0.1/32).
UNTRUSTED_PEER = "127.0.0.2"
EVENT_TYPES = [
    *sorted(UPSTREAM_ALLOWED),
    "session.created",
    "response.done",
    "transcription_session.update",
    "output_audio_buffer.clear",
    "conversation.item.delete",
    "conversation.item.retrieve",
    "",
]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=12,
)
events = st.builds(
    lambda kind, extra: json.dumps({**extra, "type": kind}),
    st.sampled_from(EVENT_TYPES) | st.text(max_size=30),
    st.dictionaries(
        st.sampled_from(["session", "response", "item", "audio", "event_id", "instructions"])
        | st.text(max_size=12),
        json_values,
        max_size=4,
    ),
)
frames = st.one_of(
    events,
    json_values.map(json.dumps),
    st.text(max_size=200),
    st.binary(max_size=200),
)


@pytest.fixture
def instance(cluster_factory, redis_server):
    """One instance (and its simulator at 10x real time) sharing the run's database."""
    cluster = cluster_factory(redis_server.url, instances=1, pace=0.1)
    return cluster


def drain(ws):
    """Read whatever the server has sent so far; the connection must still be open."""
    while True:
        try:
            ws.recv(timeout=0.05)
        except TimeoutError:
            return


def test_fuzzed_frames_never_crash_or_leak_upstream(instance):
    server = instance.instances[0]
    sent = []
    with sync_connect(
        f"{server.ws_url}/session",
        origin=server.url,
        additional_headers={"X-Forwarded-For": random_ip()},
        max_size=None,
    ) as ws:

        @settings(
            max_examples=80,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        )
        @given(frame=frames)
        def one_frame(frame):
            ws.send(frame)
            sent.append(frame)
            drain(ws)
            ws.ping().wait(5)  # still open and answering

        one_frame()
        # The session still works: a question gets its spoken answer.
        ws.send(json.dumps(user_text("Still there, duck?")))
        ws.send(json.dumps({"type": "response.create"}))
        deadline = time.monotonic() + 20
        seen = []
        while "response.done" not in seen:
            assert time.monotonic() < deadline, seen[-20:]
            try:
                seen.append(json.loads(ws.recv(timeout=1))["type"])
            except TimeoutError:
                pass
    code, body = status(server)
    assert code == 200 and body["status"] == "ok"
    assert server.process.poll() is None
    upstream = instance.upstream_event_types()
    print(f"\nfuzz: {len(sent)} frames; upstream saw {sorted(upstream)}")
    assert upstream <= UPSTREAM_ALLOWED


@pytest.mark.parametrize(
    ("size", "codes"),
    [
        (300 * 1024, {1009}),  # over DUCKE_MAX_FRAME_BYTES: the relay closes with 1009
        # Over daphne's own 1 MiB limit: autobahn sends 1009 and drops the connection, so a
        # client still sending sees 1006 (reset) as often as 1009.
        (2 * 1024 * 1024, {1009, 1006}),
    ],
)
async def test_oversized_frame_closes_with_1009(instance, size, codes):
    server = instance.instances[0]
    session = await Session.open(server)
    await session.ws.send("x" * size)
    code = await session.wait_closed(10)
    assert code in codes
    assert status(server)[0] == 200
    # The next session of the same client works.
    again = await Session.open(server, session.client_ip)
    await again.close()


async def test_forged_forwarded_for_from_untrusted_peer_counts_as_one_client(instance):
    server = instance.instances[0]

    async def attempt(number):
        try:
            ws = await connect(
                f"{server.ws_url}/session",
                origin=server.url,
                additional_headers={"X-Forwarded-For": f"203.0.113.{number}, {random_ip()}"},
                local_addr=(UNTRUSTED_PEER, 0),
                open_timeout=15,
            )
        except OSError as exc:  # refused at TCP level would be a failure too
            return ("error", repr(exc))
        session = Session(ws, UNTRUSTED_PEER)
        events = await session.until("session.updated", 15)
        if session.close_code is not None:
            reason = next((e.get("reason") for e in events if e["type"] == "quota.exceeded"), None)
            return ("refused", session.close_code, reason)
        return ("ok", session)

    results = await asyncio.gather(*(attempt(n) for n in range(1, 16)))
    accepted = [r[1] for r in results if r[0] == "ok"]
    refused = [r for r in results if r[0] == "refused"]
    assert len(accepted) <= 2, results  # the concurrent-session limit of one client
    assert len(accepted) + len(refused) == 15, results
    assert {r[1] for r in refused} == {4429}
    assert sum(r[2] == "rate_limited" for r in refused) >= 10
    for session in accepted:
        await session.close()
    # HTTP: 65 requests with forged headers from the untrusted peer are one client (60/min).
    transport = httpx.AsyncHTTPTransport(local_address=UNTRUSTED_PEER)
    async with httpx.AsyncClient(transport=transport, timeout=10) as client:
        codes = [
            (
                await client.get(
                    f"{server.url}/status", headers={"X-Forwarded-For": f"198.51.100.{n}"}
                )
            ).status_code
            for n in range(65)
        ]
    assert codes.count(200) == 60 and codes.count(429) == 5, codes
    assert status(server)[0] == 200
    assert server.process.poll() is None


async def test_clients_that_never_read_are_cut_off_before_the_server_grows(
    cluster_factory, redis_server, it_database, budget
):
    backlog = 1024 * 1024
    cluster = cluster_factory(
        redis_server.url,
        instances=1,
        pace=0.1,
        env={"DUCKE_MAX_SEND_BACKLOG_BYTES": str(backlog)},
    )
    server = cluster.instances[0]
    readers = 4
    # This test is about clients that never read: budgets (each answer reserved at its worst
    # case) must not end the sessions first.
    budget(session_cap_usd="100", hourly_cap_usd="1000", breaker_threshold_usd="2000")
    it_database.edit_policy("UPDATE quotas_spendlimit SET cap_usd = 1000")
    await asyncio.sleep(1.0)  # the policy refresh (0.5 s)
    # Warm up: one full session, so imports and caches are in the baseline.
    warm = await Session.open(server)
    await warm.turn()
    await warm.close()
    await asyncio.sleep(1)
    before = rss_kib(server.pid)
    slow = []
    for _ in range(readers):
        # A client whose receive queue holds one message: websockets stops reading the socket.
        slow.append(await Session.open(server, max_queue=1))
    started = time.monotonic()
    asked = 0
    peak = before
    asking = set(slow)
    while time.monotonic() - started < 25:
        for session in list(asking):
            try:
                await session.ask()  # answers stream back at 10x real time, never read
                asked += 1
            except ConnectionClosed:
                asking.discard(session)  # the server gave up on this client
        await asyncio.sleep(1)
        peak = max(peak, rss_kib(server.pid))
    code, body = await asyncio.to_thread(status, server)
    growth_mib = (peak - before) / 1024
    clients = [s.client_ip for s in slow]
    rows = it_database.sessions_of(clients)
    streamed = cluster.simulator_responses()
    print(
        f"\nslow readers: {readers} clients, {asked} questions, {len(streamed)} answers streamed "
        f"upstream; daphne RSS {before / 1024:.0f} MiB -> peak {peak / 1024:.0f} MiB "
        f"(+{growth_mib:.1f} MiB, backlog limit {backlog // 1024} KiB per session); "
        f"ledger end reasons {sorted(str(r[2]) for r in rows)}"
    )
    for session in slow:
        await session.ws.close()
    assert code == 200 and body["status"] == "ok"
    assert server.process.poll() is None
    # Each slow client was disconnected, its usage booked, and memory stayed bounded.
    assert sorted(r[2] for r in rows) == ["error"] * readers, rows
    finished = sorted(r for r, state in streamed.items() if state in ("completed", "cancelled"))
    everyone = it_database.sessions_of([*clients, warm.client_ip])
    assert sorted(it_database.response_ids([r[0] for r in everyone])) == finished
    assert growth_mib < readers * backlog / 2**20 + 8, "the server buffers unread audio"
