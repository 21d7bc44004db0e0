"""The local Realtime simulator (moving into a package split by job)."""

from ducke.realtime.simulator.responses import (  # noqa: F401
    CHARS_PER_TEXT_TOKEN,
    FAULTS,
    SESSION_MAX_SECONDS,
    RealtimeSimulator,
    RecordedEvent,
    SimulatorError,
    SimulatorRecorder,
)
