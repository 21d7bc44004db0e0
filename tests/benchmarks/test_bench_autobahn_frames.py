"""What autobahn (daphne's WebSocket stack) spends per relayed frame, stock and sped up.

Run with ``make bench PYTEST_ARGS=-k autobahn``. A real autobahn server protocol on a Twisted
test transport (tests/fixtures/autobahn_protocol.py) reads the browser's commonest frame (a
masked 4 KB ``input_audio_buffer.append``) and sends the relay's commonest message (a 100 ms
output audio delta), once as autobahn ships and once after
``ducke.server_workarounds.speed_up_autobahn_frames``. Each variant runs in its own process
(the workaround patches autobahn's module), alternately, ``ROUNDS`` times; the table prints
median µs per frame and the ratio sped up / stock of the same run. Reported, never asserted.
"""

import base64
import json
import os
import statistics
import subprocess
import sys
import time

import pytest

from tests.fixtures.live_server import PROJECT_ROOT

pytestmark = pytest.mark.benchmark

ROUNDS = 5
FRAMES = 2000


def measure(sped_up):
    """``{"receive": µs per browser frame, "send": µs per message}`` in this process."""
    if sped_up:
        from ducke.server_workarounds import speed_up_autobahn_frames

        speed_up_autobahn_frames()
    from tests.fixtures.autobahn_protocol import open_protocol
    from tests.fixtures.frame_streams import audio_delta_json, text_message

    protocol, transport, messages = open_protocol()
    audio = base64.b64encode(os.urandom(2880)).decode()  # 60 ms of 24 kHz pcm16
    append = json.dumps({"type": "input_audio_buffer.append", "audio": audio}).encode()
    wire = [text_message([append], mask=True) for _ in range(100)]
    delta = audio_delta_json()
    clock = time.perf_counter_ns
    started = clock()
    for index in range(FRAMES):
        protocol.dataReceived(wire[index % 100])
    receive = (clock() - started) / FRAMES / 1000
    if len(messages) != FRAMES or messages[-1] != append:
        raise RuntimeError("autobahn did not read every frame")
    started = clock()
    for index in range(FRAMES):
        protocol.sendMessage(delta, False)
        if index % 100 == 99:
            transport.clear()
    send = (clock() - started) / FRAMES / 1000
    return {"receive": receive, "send": send}


def measure_in_process(sped_up):
    code = (
        "import json, sys; from tests.benchmarks.test_bench_autobahn_frames import measure; "
        f"print(json.dumps(measure({sped_up!r})))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=PROJECT_ROOT,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_bench_autobahn_frames(bench_report):
    samples = {
        (variant, kind): [] for variant in ("stock", "sped up") for kind in ("receive", "send")
    }
    for _ in range(ROUNDS):
        for variant, sped_up in (("stock", False), ("sped up", True)):
            for kind, value in measure_in_process(sped_up).items():
                samples[variant, kind].append(value)
    medians = {key: statistics.median(values) for key, values in samples.items()}
    print(f"\nautobahn per frame, µs (median of {ROUNDS} processes, {FRAMES} frames each)")
    print(f"  {'':<34}{'stock':>10}{'sped up':>10}{'ratio':>8}")
    for kind, label in (
        ("receive", "browser frame read (4 KB, masked)"),
        ("send", "audio delta sent (6.5 KB)"),
    ):
        stock, fast = medians["stock", kind], medians["sped up", kind]
        print(f"  {label:<34}{stock:>10.1f}{fast:>10.1f}{fast / stock:>8.2f}")
        bench_report(f"autobahn {label}: µs", fast, unit="µs", ratio=fast / stock)
