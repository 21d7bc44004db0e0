"""How many o200k_base tokens a text can cost: the count used to project a response's input.

Contract: ``text_token_bound(text)`` is never fewer than the tokens o200k_base (the tokenizer of
gpt-4o and the Realtime models) makes of ``text`` encoded as ordinary text. It counts the text
alone, not the few tokens upstream adds to frame each message.

Exact count. With the ``bpe-openai`` wheel installed (pinned in requirements.txt) the count is
exact: it is a Rust BPE with the o200k_base vocabulary built in, so nothing is downloaded at run
time. Loading it takes one to two seconds and some 140 MiB per process, once (callers that come
during the load wait for it), at the first call or at ``load_o200k()``; after that a
4,000-character message costs about 0.1-0.4 ms, linear in the length even for adversarial input
(one long run of punctuation or of one letter). A serving process loads it before it takes
traffic (``quotas.startup.prepare_process(load_o200k)``): loaded by the first message instead,
it would stall the event loop of every session of the process for that long.

Fallback: the UTF-8 byte count, used when the wheel is missing or does not load on this
platform (logged once as a warning), and for texts the wheel refuses (a million characters and
more, or more than 200,000 tokens). It is always safe, because every o200k token stands for at
least one byte of the text: the tokens of a text concatenate to exactly its UTF-8 bytes, and
none is empty (a special token such as ``<|endoftext|>`` stands for its 13 characters). Lone
surrogates, which JSON lets a client send, count 3 bytes each, as much as the U+FFFD that
replaces them.

Why not a tighter fallback for ASCII, such as 4 characters a token: o200k's pre-tokenizer cuts
digits from letters and a letter run takes at most one leading non-letter, so ``"1a1a1a..."``
splits into one-byte pieces and costs one token per byte. No fixed ratio below one token per
byte holds for every ASCII text, and beating it would need the vocabulary itself. Characters
are no bound either: an emoji sequence such as a ZWJ family costs more tokens than it has
code points. The byte bound over-counts plain English about four times, which errs on the side
of refusing a response early; tests/test_text_tokens.py checks these claims against tiktoken.

``texts_token_bound(parts)`` covers the parts of one message, counted apart or joined.
"""

import logging
import threading
from collections.abc import Iterable

logger = logging.getLogger("quotas.text_tokens")

_UNLOADED = object()
_encoding = _UNLOADED
_load_lock = threading.Lock()


def _o200k():
    """The bundled o200k_base encoding, or None when it cannot be loaded here (loaded once:
    a second thread waits for the first one's load instead of loading its own copy)."""
    global _encoding
    if _encoding is _UNLOADED:
        with _load_lock:
            if _encoding is _UNLOADED:
                _encoding = _load()
    return _encoding


def _load():
    try:
        import bpe_openai

        return bpe_openai.get_encoding("o200k_base")
    except Exception as exc:  # missing wheel or one this platform cannot load: fail safe
        logger.warning(
            "o200k tokenizer unavailable (%s): text is counted as its UTF-8 bytes",
            exc.__class__.__name__,
        )
        return None


def load_o200k():
    """Load the tokenizer now (call at startup to keep the load off the relay path); True when
    counts are exact, False when the UTF-8 byte bound is in use."""
    return _o200k() is not None


def _utf8_bytes(text):
    return len(text.encode("utf-8", "surrogatepass"))


def text_token_bound(text: str) -> int:
    """Tokens the text costs in o200k_base: the exact count, or more, never fewer."""
    if not text:
        return 0
    encoding = _o200k()
    if encoding is None:
        return _utf8_bytes(text)
    try:
        return len(encoding.encode_ordinary(text))
    except ValueError:  # over the wheel's length or token limit
        return _utf8_bytes(text)


def texts_token_bound(texts: Iterable[str]) -> int:
    """Tokens several texts cost (the parts of one message), whether upstream counts them one
    by one or joined: a join can cost more than its parts, so this takes the larger."""
    texts = list(texts)
    if len(texts) == 1:
        return text_token_bound(texts[0])
    one_by_one = sum(text_token_bound(text) for text in texts)
    return max(one_by_one, text_token_bound("".join(texts)))
