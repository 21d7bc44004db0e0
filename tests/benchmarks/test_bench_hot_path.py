"""Cost of reading one upstream audio delta: the relay's unparsed read against json.loads.

Run with ``make bench PYTEST_ARGS=-k hot_path``. Both contenders read the same frames (the
simulator's stamped shape and the service's compact shape, 20 ms and 100 ms of 24 kHz pcm16)
in interleaved rounds; the table prints median microseconds per frame and the ratio
``read_audio_delta / json.loads`` measured in the same run. What json.loads costs here is
what the relay paid per delta before (it then read type, response id and delta from the
dict). Timings are reported, never asserted.
"""

import base64
import json
import os
import statistics
import time

import pytest

from ducke.realtime.upstream import read_audio_delta

pytestmark = pytest.mark.benchmark

ROUNDS = 30
PER_ROUND = 200
PCM_BYTES_PER_SECOND = 48_000


def frames():
    """(label, frame text) of the shapes the relay reads most."""
    shaped = {}
    for seconds in (0.02, 0.1):
        delta = base64.b64encode(os.urandom(int(PCM_BYTES_PER_SECOND * seconds))).decode()
        simulator = {
            "event_id": "event_8d0f1c2b3a4e5f607182",
            "type": "response.output_audio.delta",
            "response_id": "resp_0a1b2c3d4e5f60718293",
            "item_id": "item_0a1b2c3d4e5f60718293",
            "output_index": 0,
            "content_index": 0,
            "delta": delta,
            "x_seq": 1234,
            "x_sent_ns": 1234567890123456,
        }
        service = {
            "type": "response.output_audio.delta",
            "event_id": "event_CKd0fa8Qbe1TSr0gCFOcT",
            "response_id": "resp_CKd0ezRaslKDWlnG5Kc6J",
            "item_id": "item_CKd0epM2kCymCjRTpGBsF",
            "output_index": 0,
            "content_index": 0,
            "delta": delta,
        }
        ms = round(seconds * 1000)
        shaped[f"simulator, {ms} ms"] = json.dumps(simulator)
        shaped[f"service, {ms} ms"] = json.dumps(service, separators=(",", ":"))
    return shaped


def full_parse(text):
    event = json.loads(text)
    delta = event.get("delta")
    return event.get("response_id"), len(delta) if isinstance(delta, str) else 0


def median_us(contenders, text):
    samples = {name: [] for name in contenders}
    clock = time.perf_counter_ns
    for _ in range(ROUNDS):
        for name, read in contenders.items():
            started = clock()
            for _ in range(PER_ROUND):
                read(text)
            samples[name].append((clock() - started) / PER_ROUND)
    return {name: statistics.median(values) / 1000 for name, values in samples.items()}


def test_bench_audio_delta_read(bench_report):
    contenders = {"read_audio_delta": read_audio_delta, "json.loads (before)": full_parse}
    print("\nµs per upstream audio delta (median)")
    print(f"  {'frame':<20}{'chars':>8}" + "".join(f"{name:>22}" for name in contenders))
    for label, text in frames().items():
        assert read_audio_delta(text) == full_parse(text)  # the fast path is taken
        figures = median_us(contenders, text)
        print(
            f"  {label:<20}{len(text):>8}"
            + "".join(f"{figures[name]:>22.2f}" for name in contenders)
        )
        this, peer = figures["read_audio_delta"], figures["json.loads (before)"]
        bench_report(f"audio delta read, {label}: µs", this, unit="µs", ratio=this / peer)
