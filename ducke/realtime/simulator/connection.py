"""One simulated Realtime connection: its lifecycle, what it sends, and the dispatch of
client frames to the handlers of each job (session, input audio, conversation, responses)."""

import asyncio
import contextlib
import copy
import json
import logging
import time
from collections.abc import Callable

from ducke.realtime.simulator import faults
from ducke.realtime.simulator.conversation import Conversation
from ducke.realtime.simulator.input_audio import InputAudio
from ducke.realtime.simulator.protocol import (
    CLIENT_EVENT_TYPES,
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL_ERROR,
    CLOSE_POLICY_VIOLATION,
    Disconnect,
    Send,
    SimulatorError,
    new_id,
)
from ducke.realtime.simulator.recorder import SimulatorRecorder
from ducke.realtime.simulator.responses import Responses
from ducke.realtime.simulator.session import SESSION_MAX_SECONDS, SessionConfig

log = logging.getLogger(__name__)


class RealtimeSimulator(SessionConfig, InputAudio, Conversation, Responses):
    """The Realtime API for one connection: feed it client events, it sends server events."""

    def __init__(
        self,
        send: Send,
        *,
        model: str,
        recorder: SimulatorRecorder | None = None,
        pace: float = 1.0,
        fault: str = "",
        disconnect: Disconnect | None = None,
        max_session_seconds: float = SESSION_MAX_SECONDS,
        clock: Callable[[], float] = time.time,
        stamp: bool = False,
    ):
        if fault not in faults.FAULTS:
            raise ValueError(f"unknown simulator fault {fault!r}")
        self._send = send
        self._disconnect = disconnect
        self.model = model
        self.recorder = recorder
        self.pace = max(0.0, float(pace))
        self.fault = fault
        self.max_session_seconds = max_session_seconds
        self.clock = clock
        self.stamp = stamp
        self._sent_count = 0
        self.session_id = new_id("sess")
        self.session = self._initial_session()
        self.closed = False
        self._tasks: set[asyncio.Task] = set()
        self._init_conversation()
        self._init_responses()
        self._init_input_audio()

    async def start(self) -> None:
        """Open the session: send `session.created` (and play the selected fault)."""
        if self.recorder is not None:
            self.recorder.record_connection()
        if not self.model:
            await self._send_error(
                SimulatorError(
                    "missing_required_parameter",
                    "Missing required parameter: 'model' (query string).",
                    "model",
                )
            )
            await self._close_transport(CLOSE_POLICY_VIOLATION, "missing model")
            return
        await self._emit({"type": "session.created", "session": copy.deepcopy(self.session)})
        if self.fault == faults.CLOSE_AFTER_CREATED:
            await self._close_transport(CLOSE_INTERNAL_ERROR, "simulated upstream failure")
            return
        self._spawn(self._expire_session())

    async def close(self) -> None:
        """Stop every running task of this connection (the socket is gone)."""
        self.closed = True
        current = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not current and not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _expire_session(self) -> None:
        await asyncio.sleep(self.max_session_seconds)
        await self._send_error(
            SimulatorError(
                "session_expired",
                "Your session hit the maximum duration of 60 minutes.",
            )
        )
        await self._close_transport(CLOSE_GOING_AWAY, "session expired")

    async def _close_transport(self, code: int, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        if self._disconnect is not None:
            with contextlib.suppress(Exception):
                await self._disconnect(code, reason)

    async def _emit(self, event: dict) -> None:
        """Send one server event; a failed send means the socket is gone."""
        if self.closed:
            return
        event = {"event_id": new_id("event"), **event}
        if self.stamp:
            # Benchmark only: send order and a system-wide monotonic send time, so a client
            # can check frame order and loss and time each event across processes.
            event["x_seq"] = self._sent_count
            event["x_sent_ns"] = time.monotonic_ns()
            self._sent_count += 1
        try:
            await self._send(event)
        except Exception as exc:  # the transport closed under us
            log.debug("simulator %s: send failed (%s), closing", self.session_id, exc)
            self.closed = True

    async def _send_error(self, exc: SimulatorError, client_event_id: str | None = None) -> None:
        await self._emit(
            {
                "type": "error",
                "error": {
                    "type": exc.kind,
                    "code": exc.code,
                    "message": exc.message,
                    "param": exc.param,
                    "event_id": client_event_id,
                },
            }
        )

    async def handle_text(self, text: str) -> None:
        """Handle one text frame: a JSON client event, or an `error` if it is not one."""
        try:
            event = json.loads(text)
        except ValueError as exc:
            if self.recorder is not None:
                self.recorder.record_invalid_frame()
            await self._send_error(
                SimulatorError("invalid_json", f"The frame is not valid JSON: {exc}.")
            )
            return
        await self.handle(event)

    async def handle_binary(self, data: bytes) -> None:
        """Binary frames are not part of the protocol: answer with an `error`."""
        if self.recorder is not None:
            self.recorder.record_invalid_frame()
        await self._send_error(
            SimulatorError(
                "invalid_json", "Binary frames are not supported: send JSON events as text."
            )
        )

    async def handle(self, event: dict) -> None:
        """Handle one client event; mistakes become `error` events, never exceptions."""
        if self.closed:
            return
        if not isinstance(event, dict):
            if self.recorder is not None:
                self.recorder.record_invalid_frame()
            await self._send_error(
                SimulatorError("invalid_type", "A client event must be a JSON object.")
            )
            return
        client_event_id = event.get("event_id")
        if not isinstance(client_event_id, str):
            client_event_id = None
        event_type = event.get("type")
        try:
            if self.recorder is not None:
                self.recorder.record_client_event(
                    self.session_id, event, self._audio_size(event, event_type)
                )
            if not isinstance(event_type, str):
                raise SimulatorError(
                    "missing_required_parameter", "Missing required parameter: 'type'.", "type"
                )
            if event_type not in CLIENT_EVENT_TYPES:
                raise SimulatorError(
                    "invalid_value",
                    f"Invalid value: '{event_type[:100]}'. Supported values are: "
                    + ", ".join(f"'{t}'" for t in CLIENT_EVENT_TYPES)
                    + ".",
                    "type",
                )
            await getattr(self, event_type.replace(".", "_"))(event)
        except SimulatorError as exc:
            await self._send_error(exc, client_event_id)
        except Exception:
            log.exception("simulator %s: failed on a %r event", self.session_id, event_type)
            await self._send_error(
                SimulatorError(
                    "server_error", "The simulator failed on this event.", kind="server_error"
                ),
                client_event_id,
            )

    @staticmethod
    def _audio_size(event: dict, event_type) -> int:
        if event_type == "input_audio_buffer.append" and isinstance(event.get("audio"), str):
            return len(event["audio"]) * 3 // 4
        return 0
