"""The relay benchmark path, small: 3 real-time sessions through daphne, in order, none lost."""

import pytest

from tests.fixtures.relay_load import run_step, simulator_url, start_app_server

pytestmark = pytest.mark.timeout(60)


async def test_three_relayed_sessions_keep_order_and_lose_nothing(tmp_path):
    # One daphne is both the relay and its upstream (the default without DUCKE_REALTIME_URL).
    server = start_app_server(tmp_path, "daphne", DUCKE_SIMULATOR_STAMP="1")
    try:
        step = await run_step(
            simulator_url(server),
            f"{server.ws_url}/session",
            server.url,
            3,
            steady_seconds=2.0,
            warmup_seconds=0.5,
            connect_spread_seconds=0.3,
            pids={"relay": server.pid},
        )
    finally:
        server.stop()
    assert {s.chunk_ms for s in step.sessions} == {20, 40, 60}
    for session in step.sessions:
        assert not session.errors, (session.mode, session.index, session.errors)
        assert session.responses_done >= 1
        assert session.responses_done == session.responses_created
        assert session.responses_not_completed == 0
        assert session.audio_mismatches == 0
        assert (session.dropped, session.reordered) == (0, 0)
        assert session.seqs[0] == 0
    row = step.summary()
    assert row["deltas"] > 0 and row["relayed_p99"] >= row["relayed_p50"] > 0
    assert row["cpu_relay"] > 0
