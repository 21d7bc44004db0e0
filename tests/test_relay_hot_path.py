"""The relay's unparsed upstream audio-delta path reads what the full JSON parse would."""

import base64
import json

from hypothesis import example, given
from hypothesis import strategies as st

from ducke.realtime.upstream import read_audio_delta

AUDIO = base64.b64encode(bytes(range(256)) * 9).decode()
AUDIO_DELTA = "response.output_audio.delta"


def full_parse(text):
    """What the relay reads from ``text`` through ``json.loads``: (response_id, delta chars)
    of an audio delta, "other" for another valid event, None for a frame it drops."""
    try:
        event = json.loads(text)
    except ValueError:
        return None
    if not isinstance(event, dict) or event.get("type") != AUDIO_DELTA:
        return "other"
    delta = event.get("delta")
    return event.get("response_id"), len(delta) if isinstance(delta, str) else 0


def agrees(text):
    """The fast path falls back, or reads exactly what the full parse reads."""
    fast = read_audio_delta(text)
    return fast is None or fast == full_parse(text)


def delta_event(**changes):
    event = {
        "type": AUDIO_DELTA,
        "event_id": "event_CKd0fa8Qbe1TSr0gCFOcT",
        "response_id": "resp_CKd0ezRaslKDWlnG5Kc6J",
        "item_id": "item_CKd0epM2kCymCjRTpGBsF",
        "output_index": 0,
        "content_index": 0,
        "delta": AUDIO,
    }
    event.update(changes)
    return event


def simulator_frame(stamp=False):
    """The simulator's shape: event_id first, json.dumps' default separators."""
    event = delta_event()
    event = {"event_id": event.pop("event_id"), **event}
    if stamp:
        event.update(x_seq=41, x_sent_ns=1234567890123)
    return json.dumps(event)


def test_the_services_and_the_simulators_frames_take_the_fast_path():
    compact = json.dumps(delta_event(), separators=(",", ":"))
    for text in (compact, json.dumps(delta_event()), simulator_frame(), simulator_frame(True)):
        assert read_audio_delta(text) == ("resp_CKd0ezRaslKDWlnG5Kc6J", len(AUDIO)), text
        assert agrees(text)


def test_anything_unexpected_takes_the_full_parse():
    compact = json.dumps(delta_event(), separators=(",", ":"))
    for text in (
        json.dumps(delta_event(type="response.output_text.delta")),
        json.dumps(delta_event(delta="AA\\u0041A")),  # an escape: decoded length differs
        compact.replace(AUDIO[:8], "AAA\nAAAA"),  # a control character: invalid JSON
        compact.replace(AUDIO[:4], "AAA\\"),  # a backslash
        compact.replace(AUDIO[:4], "AAé"),  # not ASCII
        compact[:-1] + ',"extra":1}',  # an unknown member after the delta
        compact[:-1] + ',"x_seq":01}',  # not a JSON number
        compact[:-1] + ',"type":"error"}',  # a later duplicate wins in json.loads
        compact[:-2] + "}",  # the delta never ends
        compact + " ",
        " " + compact,
        json.dumps({k: v for k, v in delta_event().items() if k != "item_id"}),
        json.dumps(dict(reversed(list(delta_event().items())))),
        json.dumps(delta_event(response_id=None)),
        json.dumps(delta_event(output_index="0")),
        '{"type":"response.done","response":{}}',
        "",
        "{",
    ):
        assert read_audio_delta(text) is None, text


KEYS = st.sampled_from(
    [
        "type",
        "event_id",
        "response_id",
        "item_id",
        "output_index",
        "content_index",
        "delta",
        "x_seq",
        "x_sent_ns",
        "x_",
        "extra",
    ]
)
STRINGS = st.sampled_from([AUDIO_DELTA, "resp_1", "", AUDIO[:64]]) | st.text(
    alphabet=st.characters(codec="utf-8"), max_size=12
)
VALUES = (
    STRINGS
    | st.integers(min_value=-3, max_value=10**20)
    | st.none()
    | st.booleans()
    | st.floats(allow_nan=False)
)


@st.composite
def frames(draw):
    """A JSON text near the audio delta's shape: the real shape with members changed,
    dropped, added or reordered, in either separator style, maybe damaged."""
    members = list(delta_event().items())
    if draw(st.booleans()):
        members[0], members[1] = members[1], members[0]
    for _ in range(draw(st.integers(0, 3))):
        action = draw(st.sampled_from(["set", "drop", "add", "swap"]))
        index = draw(st.integers(0, len(members) - 1))
        if action == "set":
            members[index] = (members[index][0], draw(VALUES))
        elif action == "drop" and len(members) > 1:
            members.pop(index)
        elif action == "add":
            members.insert(draw(st.integers(0, len(members))), (draw(KEYS), draw(VALUES)))
        else:
            other = draw(st.integers(0, len(members) - 1))
            members[index], members[other] = members[other], members[index]
    separators = draw(st.sampled_from([(",", ":"), (", ", ": "), (",", ": "), (", ", ":")]))
    ensure_ascii = draw(st.booleans())
    parts = [
        json.dumps(key) + separators[1] + json.dumps(value, ensure_ascii=ensure_ascii)
        for key, value in members
    ]
    text = "{" + separators[0].join(parts) + "}"
    if draw(st.booleans()):  # damage: replace a slice with arbitrary text
        start = draw(st.integers(0, len(text)))
        end = draw(st.integers(start, min(len(text), start + 4)))
        text = text[:start] + draw(st.text(max_size=4)) + text[end:]
    return text


@given(frames())
@example(json.dumps(delta_event(), separators=(",", ":")))
def test_the_fast_path_agrees_with_the_full_parse(text):
    assert agrees(text)


@given(st.text(max_size=40), st.text(alphabet='AZaz09+/=" \\\n{}\x00é', max_size=24))
def test_damaged_deltas_agree_with_the_full_parse(prefix_noise, body):
    compact = json.dumps(delta_event(delta=""), separators=(",", ":"))
    head, tail = compact.split('"delta":""')
    assert agrees(head + '"delta":"' + body + '"' + tail)
    assert agrees(prefix_noise + compact)
