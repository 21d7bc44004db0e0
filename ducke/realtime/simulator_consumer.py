"""The Realtime simulator served by channels at `/simulator/v1/realtime?model=...[&fault=...]`.

Pace (real-time factor of streamed audio) comes from the `DUCKE_SIMULATOR_PACE` setting,
default 1.0; `DUCKE_SIMULATOR_STAMP` (default off) stamps every server event for benchmarks.
Every connection records into the module-level `recorder`.
"""

from urllib.parse import parse_qs

from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings

from ducke.realtime.simulator import FAULTS, RealtimeSimulator, SimulatorRecorder

# Bounded, without audio payloads: a long-running dev server must not grow without limit.
recorder = SimulatorRecorder(keep_audio=False, max_events=10_000)


class SimulatorConsumer(AsyncJsonWebsocketConsumer):
    """One simulated Realtime session per WebSocket connection."""

    simulator: RealtimeSimulator | None = None

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
            pace=float(getattr(settings, "DUCKE_SIMULATOR_PACE", 1.0)),
            fault=fault,
            disconnect=self.close_with,
            stamp=bool(getattr(settings, "DUCKE_SIMULATOR_STAMP", False)),
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
