"""Speech-like PCM synthesis and an energy voice-activity detector for the Realtime simulator.

All audio is the Realtime API's wire format: pcm16, 24 kHz, mono, little-endian.
"""

import math
import random
import sys
from array import array
from dataclasses import dataclass
from functools import cache

SAMPLE_RATE = 24_000
BYTES_PER_SAMPLE = 2
BYTES_PER_SECOND = SAMPLE_RATE * BYTES_PER_SAMPLE
VAD_FRAME_MS = 20
VAD_FRAME_BYTES = BYTES_PER_SECOND * VAD_FRAME_MS // 1000
# Default server_vad threshold 0.5 maps to an RMS of 0.02 of full scale (about -34 dBFS):
# comfortably above a quiet room, well below normal speech.
RMS_PER_THRESHOLD_UNIT = 0.04

_SYLLABLE_COUNT = 12
_SPEECH_AMPLITUDE = 0.3


def pcm_seconds(byte_count: int) -> float:
    """Duration in seconds of `byte_count` bytes of pcm16 24 kHz mono."""
    return byte_count / BYTES_PER_SECOND


def pcm_bytes(seconds: float) -> int:
    """Whole-sample byte count for `seconds` of pcm16 24 kHz mono."""
    return max(0, round(seconds * SAMPLE_RATE)) * BYTES_PER_SAMPLE


def silence_pcm(seconds: float) -> bytes:
    """Digital silence of the given duration."""
    return bytes(pcm_bytes(seconds))


def _to_le_bytes(samples: array) -> bytes:
    if sys.byteorder != "little":
        samples = array("h", samples)
        samples.byteswap()
    return samples.tobytes()


@cache
def _syllable_bank() -> tuple[bytes, ...]:
    """Voiced bursts of varying pitch and length, built once and reused for every answer."""
    rng = random.Random(1729)
    bank = []
    for _ in range(_SYLLABLE_COUNT):
        length = int(SAMPLE_RATE * rng.uniform(0.12, 0.26))
        pitch = rng.uniform(105.0, 220.0)
        glide = rng.uniform(-0.25, 0.25)  # pitch moves over a syllable, as in real speech
        harmonics = [(1, 1.0), (2, 0.55), (3, 0.3), (4, 0.15), (5, 0.07)]
        norm = sum(weight for _, weight in harmonics)
        samples = array("h")
        phase = 0.0
        for n in range(length):
            position = n / length
            phase += 2 * math.pi * pitch * (1 + glide * position) / SAMPLE_RATE
            # Raised-cosine envelope: no clicks at the burst edges.
            envelope = 0.5 - 0.5 * math.cos(2 * math.pi * position)
            value = sum(weight * math.sin(k * phase) for k, weight in harmonics) / norm
            samples.append(int(32767 * _SPEECH_AMPLITUDE * envelope * value))
        bank.append(_to_le_bytes(samples))
    return tuple(bank)


def speech_like_pcm(seconds: float, seed: int = 0) -> bytes:
    """Deterministic syllable-like voiced audio of exactly `seconds`, with pauses between words."""
    target = pcm_bytes(seconds)
    rng = random.Random(seed)
    bank = _syllable_bank()
    out = bytearray()
    syllables_left_in_word = rng.randint(1, 3)
    while len(out) < target:
        out += bank[rng.randrange(len(bank))]
        syllables_left_in_word -= 1
        if syllables_left_in_word == 0:
            out += silence_pcm(rng.uniform(0.09, 0.17))
            syllables_left_in_word = rng.randint(1, 3)
        else:
            out += silence_pcm(rng.uniform(0.02, 0.05))
    del out[target:]
    return bytes(out)


def frame_rms(frame: bytes) -> float:
    """Root mean square of a pcm16 LE frame, as a fraction of full scale (0..1)."""
    usable = len(frame) - len(frame) % BYTES_PER_SAMPLE
    if not usable:
        return 0.0
    samples = array("h")
    samples.frombytes(frame[:usable])
    if sys.byteorder != "little":
        samples.byteswap()
    total = sum(s * s for s in samples)
    return math.sqrt(total / len(samples)) / 32768.0


@dataclass(frozen=True)
class VadEvent:
    """A speech boundary found by `EnergyVad`, in ms from the start of all audio fed."""

    kind: str  # "speech_started" | "speech_stopped"
    audio_ms: int


class EnergyVad:
    """Server-VAD stand-in: speech is any 20 ms frame whose RMS is over a threshold."""

    def __init__(
        self,
        *,
        threshold: float = 0.5,
        silence_duration_ms: int = 500,
        prefix_padding_ms: int = 300,
    ):
        self.rms_threshold = max(threshold, 0.0) * RMS_PER_THRESHOLD_UNIT
        self.silence_duration_ms = silence_duration_ms
        self.prefix_padding_ms = prefix_padding_ms
        self.in_speech = False
        self.position_ms = 0  # end of the last whole frame analysed
        self._silence_run_ms = 0
        self._partial = b""

    def reset(self) -> None:
        """Forget any speech in progress (the buffer was cleared or committed by hand)."""
        self.in_speech = False
        self._silence_run_ms = 0

    def feed(self, pcm: bytes) -> list[VadEvent]:
        """Analyse more audio; return the speech boundaries it completes."""
        data = self._partial + pcm if self._partial else pcm
        whole = len(data) - len(data) % VAD_FRAME_BYTES
        self._partial = data[whole:]
        events = []
        for offset in range(0, whole, VAD_FRAME_BYTES):
            frame_start = self.position_ms
            self.position_ms += VAD_FRAME_MS
            voiced = frame_rms(data[offset : offset + VAD_FRAME_BYTES]) >= self.rms_threshold
            if not self.in_speech:
                if voiced:
                    self.in_speech = True
                    self._silence_run_ms = 0
                    start = max(0, frame_start - self.prefix_padding_ms)
                    events.append(VadEvent("speech_started", start))
                continue
            self._silence_run_ms = 0 if voiced else self._silence_run_ms + VAD_FRAME_MS
            if self._silence_run_ms >= self.silence_duration_ms:
                self.in_speech = False
                events.append(VadEvent("speech_stopped", self.position_ms))
        return events
