"""``batch_mask_keys``: websockets' frame mask keys come from ``os.urandom`` in batches."""

import os

from websockets import frames
from websockets.frames import Frame, Opcode

from ducke.server_workarounds import MaskKeys, batch_mask_keys


def test_keys_are_fresh_bytes_of_the_asked_length():
    keys = MaskKeys()
    drawn = [keys.token_bytes(4) for _ in range(3 * MaskKeys.BATCH // 4)]  # three batches
    assert all(len(key) == 4 for key in drawn)
    # Slices of os.urandom output: 3,072 keys of 32 random bits repeat with odds ~1e-3.
    assert len(set(drawn)) >= len(drawn) - 2
    assert len(keys.token_bytes()) == 32  # secrets.token_bytes' default
    assert len(keys.token_bytes(10_000)) == 10_000  # more than a batch


def test_a_batch_is_one_urandom_call(monkeypatch):
    calls = []
    urandom = os.urandom

    def counting_urandom(n):
        calls.append(n)
        return urandom(n)

    monkeypatch.setattr("ducke.server_workarounds.os.urandom", counting_urandom)
    keys = MaskKeys()
    for _ in range(MaskKeys.BATCH // 4 + 1):
        keys.token_bytes(4)
    assert calls == [MaskKeys.BATCH, MaskKeys.BATCH]


def test_websockets_masks_frames_with_batched_keys():
    batch_mask_keys()
    assert isinstance(frames.secrets, MaskKeys)
    batch_mask_keys()  # idempotent
    payload = b'{"type": "input_audio_buffer.append", "audio": "AAAA"}'
    wire = Frame(Opcode.TEXT, payload).serialize(mask=True, extensions=[])
    mask, masked = wire[2:6], wire[6:]
    assert bytes(b ^ mask[i % 4] for i, b in enumerate(masked)) == payload
    masks = {Frame(Opcode.TEXT, payload).serialize(mask=True, extensions=[])[2:6] for _ in range(3)}
    assert len(masks) > 1  # keys change from frame to frame
