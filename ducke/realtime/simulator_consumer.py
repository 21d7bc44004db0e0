"""The Realtime simulator served by channels at `/simulator/v1/realtime?model=...[&fault=...]`.

Pace (real-time factor of streamed audio) comes from the `DUCKE_SIMULATOR_PACE` setting,
default 1.0; `DUCKE_SIMULATOR_STAMP` (default off) stamps every server event for benchmarks.
Every connection records into the module-level `recorder`; with `DUCKE_SIMULATOR_LOG` set,
the recorder also appends what it sees to that JSON-lines file, so a test in another process
can check what reached upstream and count the responses.
"""

import json
import threading
from urllib.parse import parse_qs

from channels.generic.websocket import AsyncJsonWebsocketConsumer

from ducke.conf import ducke_settings
from ducke.realtime.simulator import FAULTS, RealtimeSimulator, SimulatorRecorder


class LoggedRecorder(SimulatorRecorder):
    """A recorder that also appends one JSON line per client event and per response.done.

    Lines: ``{"connection", "client_event": <type>}`` and ``{"connection", "response_done":
    <response id>, "status"}``. The file comes from ``DUCKE_SIMULATOR_LOG`` at each write, so
    the log stays off unless that setting names a file.
    """

    def __init__(self, **kwargs):
        self._log_lock = threading.Lock()
        self._log_files = {}
        super().__init__(**kwargs)

    def _log(self, line):
        path = ducke_settings.SIMULATOR_LOG
        if not path:
            return
        text = json.dumps(line, default=repr) + "\n"
        with self._log_lock:
            handle = self._log_files.get(path)
            if handle is None:
                handle = self._log_files[path] = open(path, "a", encoding="utf-8")
            handle.write(text)
            handle.flush()

    def record_client_event(self, connection_id, event, audio_bytes=0):
        super().record_client_event(connection_id, event, audio_bytes)
        self._log({"connection": connection_id, "client_event": event.get("type")})

    def record_response_done(self, connection_id, response):
        super().record_response_done(connection_id, response)
        self._log(
            {
                "connection": connection_id,
                "response_done": response.get("id"),
                "status": response.get("status"),
            }
        )


# Bounded, without audio payloads: a long-running dev server must not grow without limit.
recorder = LoggedRecorder(keep_audio=False, max_events=10_000)


class SimulatorConsumer(AsyncJsonWebsocketConsumer):
    """One simulated Realtime session per WebSocket connection."""

    simulator: RealtimeSimulator | None = None
    # No channel layer: the simulator receives no group messages, and a Redis layer's idle
    # 5 s reads (see ducke.consumers) would only risk ending the upstream session.
    channel_layer_alias = "ducke-simulator-none"

    async def connect(self):
        query = parse_qs(self.scope.get("query_string", b"").decode("latin-1"))
        model = query.get("model", [""])[0]
        fault = query.get("fault", [""])[0]
        if fault == "reject" or fault not in FAULTS:
            await self.close()  # before accept: the server answers the handshake with 403
            return
        await self.accept()
        self.simulator = RealtimeSimulator(
            self.send_json,
            model=model,
            recorder=recorder,
            pace=float(ducke_settings.SIMULATOR_PACE),
            fault=fault,
            disconnect=self.close_with,
            stamp=bool(ducke_settings.SIMULATOR_STAMP),
        )
        await self.simulator.start()

    async def close_with(self, code: int, reason: str) -> None:
        """Close the socket with a code, as upstream does on failure or expiry."""
        await self.close(code=code, reason=reason)

    async def receive(self, text_data=None, bytes_data=None, **kwargs):
        if self.simulator is None:
            return
        if text_data is not None:
            await self.simulator.handle_text(text_data)
        else:
            await self.simulator.handle_binary(bytes_data or b"")

    async def disconnect(self, code):
        if self.simulator is not None:
            await self.simulator.close()
