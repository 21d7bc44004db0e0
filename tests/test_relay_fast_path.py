"""The relay's unparsed audio-frame path forwards exactly what the sanitizing path would."""

import base64
import json

from hypothesis import given
from hypothesis import strategies as st

from ducke.consumers import _AUDIO_APPEND_UPSTREAM, plain_audio_append, upstream_audio_frame
from ducke.realtime import client_events


def slow_path(text):
    """What the relay sends upstream for ``text`` by parsing and sanitizing, or None."""
    try:
        return json.dumps(client_events.sanitize(json.loads(text)))
    except (ValueError, client_events.RefusedEvent):
        return None


def test_browser_and_python_frames_take_the_fast_path_unchanged():
    audio = base64.b64encode(bytes(range(256)) * 3).decode()
    for text in (
        json.dumps({"type": "input_audio_buffer.append", "audio": audio}),
        json.dumps({"type": "input_audio_buffer.append", "audio": audio}, separators=(",", ":")),
    ):
        assert plain_audio_append(text) == audio
        assert _AUDIO_APPEND_UPSTREAM % audio == slow_path(text)


def test_anything_else_takes_the_sanitizing_path():
    audio = base64.b64encode(b"\x00\x01" * 30).decode()
    for text in (
        json.dumps({"event_id": "e1", "type": "input_audio_buffer.append", "audio": audio}),
        json.dumps({"type": "input_audio_buffer.append", "audio": audio, "extra": 1}),
        json.dumps({"audio": audio, "type": "input_audio_buffer.append"}),
        '{"type":"input_audio_buffer.append","audio":""}',
        '{"type":"input_audio_buffer.append","audio":"AAA"}',
        '{"type":"input_audio_buffer.append","audio":"AAA\n"}',
        '{"type":"input_audio_buffer.append","audio":"AA\\u0041A"}',
        '{"type":"input_audio_buffer.append","audio":"AAAA"} ',
        '{"type":"input_audio_buffer.commit"}',
    ):
        assert plain_audio_append(text) is None, text


PREFIXES = st.sampled_from(
    [
        '{"type":"input_audio_buffer.append","audio":"',
        '{"type": "input_audio_buffer.append", "audio": "',
        '{"type":"input_audio_buffer.append", "audio":"',
    ]
)
BODIES = st.text(alphabet='AZaz09+/=" \\\n{}', max_size=24) | st.binary(max_size=40).map(
    lambda raw: base64.b64encode(raw).decode()
)


@given(PREFIXES, BODIES, st.sampled_from(['"}', '" }', '"}}', "}", '"']))
def test_fast_path_agrees_with_the_sanitizing_path(prefix, body, suffix):
    text = prefix + body + suffix
    audio = plain_audio_append(text)
    if audio is not None:
        assert _AUDIO_APPEND_UPSTREAM % audio == slow_path(text)


@given(PREFIXES, BODIES, st.sampled_from(['"}', '" }', '"}}', "}", '"']))
def test_the_frame_sent_upstream_is_the_sanitizing_paths(prefix, body, suffix):
    text = prefix + body + suffix
    fast = upstream_audio_frame(text.encode())
    audio = plain_audio_append(text)
    assert (fast is None) == (audio is None)
    if fast is not None:
        nbytes, upstream = fast
        assert upstream.decode() == slow_path(text)
        assert nbytes == len(base64.b64decode(audio)) + audio.count("=")


@given(st.text(alphabet="AZaz09+/=é\n", max_size=16))
def test_the_base64_check_is_the_regexs(audio):
    import re

    from ducke.consumers import _padded_base64

    expected = re.fullmatch(r"[A-Za-z0-9+/]*={0,2}", audio) is not None and bool(audio.rstrip("="))
    assert _padded_base64(audio.encode()) == expected
