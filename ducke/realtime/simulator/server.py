"""The simulator served by `websockets` alone, at ws://HOST:PORT/v1/realtime?model=...[&fault=...]

The URL the openai SDK builds from `websocket_base_url=server.base_url`, and what a relay
takes as its upstream (`DUCKE_REALTIME_URL`). No Django, no Channels: the test fixture runs a
`SimulatorServer` in the test's own event loop, and the relay benchmark runs one in its own
process, so that the harness costs as little CPU as it can:

    python -m ducke.realtime.simulator.server --port 47001 --pace 1.0 --stamp

Wrong paths are refused with 404 and the `reject` fault with 403, before the upgrade.
"""

import argparse
import asyncio
import json
import os
import signal
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from ducke.realtime.simulator.connection import RealtimeSimulator
from ducke.realtime.simulator.faults import FAULTS, REJECT
from ducke.realtime.simulator.recorder import SimulatorRecorder
from ducke.realtime.simulator.session import SESSION_MAX_SECONDS

REALTIME_PATH = "/v1/realtime"
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


@dataclass
class SimulatorServer:
    """A simulator endpoint: where to connect, what it recorded, how the next sessions behave."""

    recorder: SimulatorRecorder = field(default_factory=SimulatorRecorder)
    pace: float = 0.0
    fault: str = ""
    max_session_seconds: float = SESSION_MAX_SECONDS
    stamp: bool = False
    port: int = 0
    keep_simulators: bool = True
    simulators: list[RealtimeSimulator] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1"

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}{REALTIME_PATH}"

    def _fault_for(self, path: str) -> str:
        return parse_qs(urlsplit(path).query).get("fault", [self.fault])[0]

    def check_handshake(self, connection: ServerConnection, request):
        """Refuse wrong paths (404) and the `reject` fault (403) before the upgrade."""
        if urlsplit(request.path).path != REALTIME_PATH:
            return connection.respond(HTTPStatus.NOT_FOUND, "no such endpoint\n")
        fault = self._fault_for(request.path)
        if fault == REJECT or fault not in FAULTS:
            return connection.respond(HTTPStatus.FORBIDDEN, "simulated handshake rejection\n")
        return None

    async def serve_connection(self, websocket: ServerConnection) -> None:
        """Run one simulated session over a `websockets` connection."""
        path = websocket.request.path
        query = parse_qs(urlsplit(path).query)

        async def send(event: dict) -> None:
            await websocket.send(json.dumps(event))

        simulator = RealtimeSimulator(
            send,
            model=query.get("model", [""])[0],
            recorder=self.recorder,
            pace=self.pace,
            fault=self._fault_for(path),
            disconnect=websocket.close,
            max_session_seconds=self.max_session_seconds,
            stamp=self.stamp,
        )
        if self.keep_simulators:
            self.simulators.append(simulator)
        try:
            await simulator.start()
            async for message in websocket:
                if isinstance(message, str):
                    await simulator.handle_text(message)
                else:
                    await simulator.handle_binary(message)
        except ConnectionClosed:
            pass
        finally:
            await simulator.close()

    def serve(self, host: str = "127.0.0.1", port: int | None = None):
        """The `websockets` server (an async context manager) for this endpoint; port 0
        picks a free one (read it from the server's sockets)."""
        return serve(
            self.serve_connection,
            host,
            self.port if port is None else port,
            process_request=self.check_handshake,
            max_size=MAX_MESSAGE_BYTES,
            compression=None,
        )


async def run(server: SimulatorServer, host: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT."""
    stop = asyncio.get_running_loop().create_future()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.cancel)
    async with server.serve(host, port) as ws_server:
        server.port = ws_server.sockets[0].getsockname()[1]
        print(f"simulator on {server.url} (pid {os.getpid()})", flush=True)
        try:
            await stop
        except asyncio.CancelledError:
            pass


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--pace", type=float, default=1.0, help="audio speed, 1.0 = real time")
    parser.add_argument("--stamp", action="store_true", help="x_seq / x_sent_ns on every event")
    args = parser.parse_args(argv)
    # A long-running process keeps no per-connection history and no audio payloads.
    server = SimulatorServer(
        recorder=SimulatorRecorder(keep_audio=False, max_events=10_000),
        pace=args.pace,
        stamp=args.stamp,
        keep_simulators=False,
    )
    asyncio.run(run(server, args.host, args.port))


if __name__ == "__main__":
    main()
