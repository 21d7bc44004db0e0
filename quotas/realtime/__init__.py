"""The OpenAI Realtime add-on of quotas: what a Realtime relay needs on top of the generic core.

- ``quotas.realtime.meter``: ``SessionMeter`` meters one Realtime session (reservations
  before ``response.create``, exact booking of ``response.done``, transcriptions and tools,
  the pcm16 audio projection that cancels a response before it passes a cap).
- ``quotas.realtime.usage``: a Realtime ``usage`` in the six billing kinds (``TokenCounts``),
  and the audio rates (pcm16 bytes and billed tokens per second).
- ``quotas.realtime.prices``: OpenAI's price sheets (``PRICE_SHEETS``), ``load_price_sheet``.
- ``quotas.realtime.text_tokens``: the o200k_base bound of a text's tokens.

It imports from the generic core only (never from a project); the core never imports it at
import time, so a project without a Realtime relay need not load it. (Two ledger functions of
the meter are still called by the core at run time, the guard's admission and the stale-session
sweep: see quotas/README.md.)
"""
