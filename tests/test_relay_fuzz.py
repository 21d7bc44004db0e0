"""Hypothesis fuzz of browser frames through the real relay: nothing else reaches upstream."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ducke.realtime.client_events import sanitize
from tests.fixtures.relay import UPSTREAM_EVENT_TYPES, SessionClient

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("close_worker_connections"),
]

ALLOWED_UPSTREAM = UPSTREAM_EVENT_TYPES

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=15,
)
events = st.fixed_dictionaries(
    {"type": st.sampled_from([*sorted(ALLOWED_UPSTREAM), "session.create", "response.update"])},
    optional={
        "session": json_values,
        "response": json_values,
        "item": json_values,
        "audio": st.text(alphabet="AB+/=", max_size=16) | json_values,
        "instructions": st.text(max_size=20),
        "tools": json_values,
    },
)
frames = st.one_of(
    events.map(json.dumps),
    json_values.map(json.dumps),
    st.text(max_size=200),
    st.binary(max_size=64),
    st.just("x" * 300_000),  # over DUCKE_MAX_FRAME_BYTES: closes with 1009
)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(batch=st.lists(frames, min_size=1, max_size=8))
async def test_random_frames_never_break_the_relay(relay_app, simulator, batch):
    from quotas.limiter import get_limiter

    get_limiter().local.clear()  # many sessions from one address in one test
    simulator.recorder.reset()
    browser = SessionClient(relay_app, client="10.77.0.1")
    assert (await browser.connect())[0]
    await browser.receive_until("session.updated")
    for frame in batch:
        if isinstance(frame, bytes):
            await browser.send_bytes(frame)
        else:
            await browser.send_text(frame)
    await browser.disconnect()
    sent = [r.event for r in simulator.recorder.client_events]
    assert sent[0]["type"] == "session.update" and "instructions" in sent[0]["session"]
    for event in sent[1:]:
        assert event["type"] in ALLOWED_UPSTREAM
        # Each forwarded event is exactly the sanitised form of something the browser sent.
        assert sanitize(event) == event
        if event["type"] == "session.update":
            assert set(event["session"]) == {"type", "audio"}
