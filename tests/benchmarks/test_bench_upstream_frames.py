"""What the relay's upstream client spends reading a frame: websockets' own connection and
``UpstreamConnection``.

Run with ``make bench PYTEST_ARGS=-k upstream_frames``. Each connection sits on an in-memory
transport (tests/fixtures/upstream_connection.py) past its opening handshake and reads the
upstream's commonest frame, a 100 ms ``response.output_audio.delta`` (6.5 KB), one TCP read
per frame, each read then taken with ``recv()`` as the relay's loop takes it. The two
alternate over ``ROUNDS`` rounds in this process; the table prints median µs per frame and the
ratio UpstreamConnection / websockets of the same rounds. Reported, never asserted.
"""

import asyncio
import statistics
import time

import pytest
from websockets.asyncio.client import ClientConnection
from websockets.frames import Opcode

from ducke.server_workarounds import UpstreamConnection
from tests.fixtures.frame_streams import audio_delta_json, frame
from tests.fixtures.upstream_connection import open_upstream_connection

pytestmark = pytest.mark.benchmark

ROUNDS = 7
FRAMES = 3000


def delta_frame():
    return frame(Opcode.TEXT, audio_delta_json())


async def microseconds_per_frame(connection_class, wire):
    connection, _, response = open_upstream_connection(connection_class)
    connection.data_received(response)
    clock = time.perf_counter_ns
    started = clock()
    for _ in range(FRAMES):
        connection.data_received(wire)
        await connection.recv()
    elapsed = (clock() - started) / FRAMES / 1000
    connection.connection_lost(None)
    return elapsed


def test_upstream_frame_reads(bench_report):
    wire = delta_frame()
    times = {ClientConnection: [], UpstreamConnection: []}

    async def rounds():
        for _ in range(ROUNDS):
            for connection_class in times:
                times[connection_class].append(await microseconds_per_frame(connection_class, wire))

    asyncio.run(rounds())
    stock = statistics.median(times[ClientConnection])
    ours = statistics.median(times[UpstreamConnection])
    pairs = zip(times[UpstreamConnection], times[ClientConnection], strict=True)
    ratios = [ours_round / stock_round for ours_round, stock_round in pairs]
    print(f"\nupstream frame read + recv(), {len(wire)} B audio delta, {ROUNDS} rounds:")
    print(f"  websockets ClientConnection  {stock:7.2f} µs per frame (median)")
    print(f"  UpstreamConnection           {ours:7.2f} µs per frame (median)")
    print(f"  ratio ours / stock           {statistics.median(ratios):7.2f} (median of rounds)")
    bench_report("upstream frame read, websockets", stock, unit="µs")
    bench_report(
        "upstream frame read, UpstreamConnection", ours, unit="µs", ratio=statistics.median(ratios)
    )
