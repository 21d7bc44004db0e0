"""Cost of counting one typed message: text_token_bound against tiktoken and the old estimate.

Run with ``make bench PYTEST_ARGS=-k text_tokens``. Each contender counts the same
4,000-character texts (the relay's cap on typed text) in interleaved rounds; the table prints
median microseconds per text, and the summary takes ``text_token_bound`` against tiktoken
measured in the same run. A second figure is the one-off cost of loading the tokenizer in a
fresh interpreter (seconds and resident MiB). Timings are reported, never asserted.
"""

import json
import pathlib
import statistics
import subprocess
import sys
import time

import pytest

from ducke.realtime.client_events import MAX_TEXT_CHARS
from quotas.realtime.text_tokens import load_o200k, text_token_bound

pytestmark = pytest.mark.benchmark

ROUNDS = 15
PER_ROUND = 20
KINDS = {
    "english": "The relay projects the cost of the next response before it starts. ",
    "code": "def f(x):\n    return {k: v ** 2 for k, v in x.items() if v > 0}  # ok\n",
    "chinese": "请帮我检查这段代码为什么在并发请求时会超出预算上限。",
    "emoji": "👩‍👩‍👧‍👦 🇫🇷🇯🇵 👍🏽 😀 ",
    "punctuation run": "!@#$%^&*()_+-=[]{}|;:,./<>?~",
}
LOAD_PROBE = """
import json, sys, time
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
before, started = rss(), time.perf_counter()
from quotas.realtime.text_tokens import load_o200k
exact = load_o200k()
print(json.dumps({"exact": exact, "seconds": time.perf_counter() - started,
                  "mib": rss() - before}))
"""


def sized(text):
    return (text * (MAX_TEXT_CHARS // len(text) + 1))[:MAX_TEXT_CHARS]


def median_us(contenders, text):
    samples = {name: [] for name in contenders}
    for count in contenders.values():
        count(text)
    clock = time.perf_counter_ns
    for _ in range(ROUNDS):
        for name, count in contenders.items():
            for _ in range(PER_ROUND):
                started = clock()
                count(text)
                samples[name].append(clock() - started)
    return {name: statistics.median(values) / 1000 for name, values in samples.items()}


def test_bench_text_token_bound(o200k_reference, bench_report):
    if not load_o200k():
        pytest.skip("the bundled o200k tokenizer (bpe-openai) is not installed here")
    contenders = {
        "text_token_bound": text_token_bound,
        "tiktoken (reference)": o200k_reference,
        "UTF-8 bytes (fallback)": lambda text: len(text.encode("utf-8", "surrogatepass")),
        "chars / 4 (before)": lambda text: len(text) / 4,
    }
    print(f"\nµs per {MAX_TEXT_CHARS}-character text (median)")
    print(f"  {'text':<18}" + "".join(f"{name:>24}" for name in contenders) + f"{'tokens':>8}")
    worst = 0.0
    for kind, unit in KINDS.items():
        text = sized(unit)
        figures = median_us(contenders, text)
        assert text_token_bound(text) == o200k_reference(text)
        print(
            f"  {kind:<18}"
            + "".join(f"{figures[name]:>24.1f}" for name in contenders)
            + f"{text_token_bound(text):>8}"
        )
        this, peer = figures["text_token_bound"], figures["tiktoken (reference)"]
        worst = max(worst, this)
        bench_report(f"{kind}, 4,000 chars: µs", this, unit="µs", ratio=this / peer)
    bench_report("slowest kind, 4,000 chars (target < 1 ms)", worst, unit="µs", target="< 1000")


def test_bench_tokenizer_load(bench_report):
    probe = subprocess.run(
        [sys.executable, "-c", LOAD_PROBE],
        capture_output=True,
        text=True,
        check=True,
        cwd=pathlib.Path(__file__).resolve().parents[2],
    )
    loaded = json.loads(probe.stdout.strip().splitlines()[-1])
    if not loaded["exact"]:
        pytest.skip("the bundled o200k tokenizer (bpe-openai) is not installed here")
    print(f"\ntokenizer load: {loaded['seconds']:.2f} s, {loaded['mib']:.0f} MiB resident")
    bench_report("tokenizer load, once per process", loaded["seconds"], unit="s")
    bench_report("tokenizer resident memory", loaded["mib"], unit="MiB")
