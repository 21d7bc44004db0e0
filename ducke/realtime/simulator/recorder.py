"""The request log: what every simulator connection received and billed, for tests.

One `SimulatorRecorder` is shared by the connections of a server (thread-safe); the channels
transport subclasses it to also append JSON lines to a file (`simulator_consumer`).
"""

import threading
from collections import Counter, deque
from dataclasses import dataclass


@dataclass(frozen=True)
class RecordedEvent:
    """One event seen by the recorder, with the connection (session id) it belongs to."""

    connection_id: str
    event: dict


class SimulatorRecorder:
    """What every simulator connection received and billed; shared by connections, for tests."""

    def __init__(self, *, keep_audio: bool = True, max_events: int | None = None):
        self.keep_audio = keep_audio
        self.max_events = max_events
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Forget everything recorded so far."""
        with self._lock:
            self.client_events: deque[RecordedEvent] = deque(maxlen=self.max_events)
            self.responses: deque[RecordedEvent] = deque(maxlen=self.max_events)
            self.statuses: Counter[str] = Counter()
            self.connections = 0
            self.audio_bytes_received = 0
            self.invalid_frames = 0

    @property
    def completed(self) -> int:
        """Responses that ended with status `completed`."""
        return self.statuses["completed"]

    @property
    def cancelled(self) -> int:
        """Responses that ended with status `cancelled`."""
        return self.statuses["cancelled"]

    def record_connection(self) -> None:
        """Count a new simulator session."""
        with self._lock:
            self.connections += 1

    def record_client_event(self, connection_id: str, event: dict, audio_bytes: int = 0) -> None:
        """Keep a client event (audio payloads are dropped unless `keep_audio`)."""
        if audio_bytes and not self.keep_audio:
            event = {**event, "audio": f"<{audio_bytes} bytes>"}
        with self._lock:
            self.client_events.append(RecordedEvent(connection_id, event))
            self.audio_bytes_received += audio_bytes

    def record_invalid_frame(self) -> None:
        """Count a frame that was not a JSON object."""
        with self._lock:
            self.invalid_frames += 1

    def record_response_done(self, connection_id: str, response: dict) -> None:
        """Keep the `response` object of a `response.done` sent, with its usage."""
        with self._lock:
            self.responses.append(RecordedEvent(connection_id, response))
            self.statuses[response.get("status") or "unknown"] += 1

    def client_event_types(self, connection_id: str | None = None) -> list[str]:
        """Types of the client events received, in order (optionally for one connection)."""
        with self._lock:
            records = list(self.client_events)
        return [
            r.event.get("type")
            for r in records
            if connection_id is None or r.connection_id == connection_id
        ]

    def usages(self) -> list[dict]:
        """The `usage` of every `response.done` sent, in order."""
        with self._lock:
            return [r.event.get("usage") or {} for r in self.responses]
