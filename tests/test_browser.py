"""DUCK-E in a real browser: Debian chromium driven by Playwright against a daphne server.

Skips when /usr/bin/chromium is missing, unless DUCKE_REQUIRE_BROWSER=1 (then it fails).
Every page records Content-Security-Policy violations (``securitypolicyviolation`` events and
chromium's console reports); a test that ends with ``assert_page_clean`` saw none.
"""

import importlib.util
import math
import os
import struct
import wave
from pathlib import Path

import pytest

from tests.fixtures import live_server

daphne_server_factory = live_server.daphne_server_factory

pytestmark = [pytest.mark.browser, pytest.mark.timeout(60)]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-gpu",
]
WAIT_MS = 20_000
STATIC = "/static/ducke/"


def require_chromium():
    """Skip (or fail under DUCKE_REQUIRE_BROWSER=1) when chromium or Playwright is missing."""
    problem = None
    if not CHROMIUM.exists():
        problem = f"{CHROMIUM} is not installed"
    elif importlib.util.find_spec("playwright") is None:
        problem = "the playwright package is not installed"
    if problem:
        if os.environ.get("DUCKE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"DUCKE_REQUIRE_BROWSER=1 but {problem}")
        pytest.skip(problem)


def write_wav(path, samples, rate=48_000):
    """Write mono pcm16 samples (floats in -1..1) as a WAV file for the fake microphone."""
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(b"".join(struct.pack("<h", round(s * 32767)) for s in samples))
    return path


def voiced(seconds, rate=48_000):
    """A voiced, syllable-modulated signal loud enough for the simulator's energy VAD."""
    samples = []
    for n in range(int(rate * seconds)):
        t = n / rate
        harmonics = sum(math.sin(2 * math.pi * 140 * k * t) / k for k in range(1, 8))
        syllables = 0.55 + 0.45 * math.sin(2 * math.pi * 4 * t)
        samples.append(0.3 * harmonics * syllables)
    return samples


def silent(seconds, rate=48_000):
    return [0.0] * int(rate * seconds)


def spoken_like_burst():
    """Silence, one spoken-like question, then silence."""
    return silent(0.6) + voiced(1.4) + silent(4.0)


@pytest.fixture
def launch_browser():
    """Launch chromium with extra arguments; closes everything at the end of the test."""
    require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browsers = []

        def launch(*extra_args):
            browser = playwright.chromium.launch(
                executable_path=str(CHROMIUM), args=[*CHROMIUM_ARGS, *extra_args], timeout=20_000
            )
            browsers.append(browser)
            return browser

        yield launch
        for browser in browsers:
            browser.close()


# Runs before any script of the page (and again in every new document).
CSP_RECORDER = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", (event) => {
  window.__cspViolations.push(
    `${event.effectiveDirective} blocked ${event.blockedURI || "inline"}` +
    ` at ${event.sourceFile || "?"}:${event.lineNumber}`);
}, true);
"""


def record_csp_violations(page):
    """Collect the page's CSP violations: events in the page, reports on the console."""
    page.add_init_script(CSP_RECORDER)
    page.csp_console = []

    def on_console(message):
        if "Content Security Policy" in message.text:
            page.csp_console.append(message.text)

    page.on("console", on_console)


def csp_violations(page):
    """Every CSP violation the current document and the console reported so far."""
    recorded = page.evaluate("() => window.__cspViolations || ['recorder missing']")
    return [*recorded, *page.csp_console]


def assert_page_clean(page):
    """No uncaught JS error and no CSP violation on ``page``."""
    assert page.js_errors == []
    assert csp_violations(page) == []


def open_page(browser, url):
    """A fresh context with the microphone granted, on the DUCK-E page, collecting JS errors
    and CSP violations."""
    context = browser.new_context(viewport={"width": 900, "height": 1100})
    context.grant_permissions(["microphone"], origin=url)
    page = context.new_page()
    page.js_errors = []
    page.on("pageerror", lambda error: page.js_errors.append(str(error)))
    record_csp_violations(page)
    page.goto(f"{url}/")
    return page


def root_data(page):
    return page.evaluate("() => ({...document.getElementById('ducke').dataset})")


def wait_for_data(page, condition, timeout=WAIT_MS):
    """Wait until ``condition`` (JS over ``d``, the #ducke dataset) holds, else show the data."""
    script = f"() => {{ const d = document.getElementById('ducke').dataset; return {condition}; }}"
    try:
        page.wait_for_function(script, timeout=timeout)
    except Exception as exc:
        raise AssertionError(f"timed out waiting for {condition}: {root_data(page)}") from exc


@pytest.fixture
def voice_server(daphne_server_factory):
    """A DUCK-E server with the /session relay and the simulator (skips while they are absent)."""
    for module in ("ducke.consumers", "ducke.realtime.simulator_consumer"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"awaits the /session relay and simulator ({module} is missing)")
    return daphne_server_factory()


def start_session(page):
    page.click("#start")
    wait_for_data(page, "d.state === 'live'")


WORKLET_CHECK = """
async ({contextRate, captureUrl, playbackUrl}) => {
  const ctx = new AudioContext({sampleRate: contextRate});
  await ctx.audioWorklet.addModule(captureUrl);
  await ctx.audioWorklet.addModule(playbackUrl);
  const chunks = [];
  const capture = new AudioWorkletNode(ctx, "ducke-capture", {
    processorOptions: {targetRate: 24000, chunkMs: 50},
  });
  capture.port.onmessage = (event) => chunks.push(event.data);
  const tone = new OscillatorNode(ctx, {frequency: 440});
  const mute = new GainNode(ctx, {gain: 0});
  tone.connect(new GainNode(ctx, {gain: 0.5})).connect(capture).connect(mute);
  mute.connect(ctx.destination);
  tone.start();
  await ctx.resume();
  await new Promise((resolve) => setTimeout(resolve, 700));
  tone.stop();
  const sizes = chunks.map((chunk) => chunk.pcm.byteLength);
  const samples = [];
  for (const chunk of chunks) {
    const view = new DataView(chunk.pcm);
    for (let i = 0; i < chunk.pcm.byteLength; i += 2) samples.push(view.getInt16(i, true));
  }
  // Skip the first 100 ms (filter settling), then count rising zero crossings.
  const steady = samples.slice(2400);
  let rising = 0;
  for (let i = 1; i < steady.length; i += 1) if (steady[i - 1] < 0 && steady[i] >= 0) rising += 1;
  const peak = Math.max(...steady.map(Math.abs));

  const stats = [];
  const playback = new AudioWorkletNode(ctx, "ducke-playback", {
    numberOfInputs: 0, numberOfOutputs: 1, outputChannelCount: [1],
    processorOptions: {sourceRate: 24000},
  });
  playback.port.onmessage = (event) => stats.push(event.data);
  playback.connect(ctx.destination);
  const pushed = 7200;  // 300 ms at 24 kHz, in three network-sized pieces
  for (let piece = 0; piece < 3; piece += 1) {
    const samples24k = new Float32Array(pushed / 3).map((_, i) => 0.2 * Math.sin(i / 5));
    playback.port.postMessage({type: "push", samples: samples24k}, [samples24k.buffer]);
  }
  playback.port.postMessage({type: "drain"});
  const started = performance.now();
  while (performance.now() - started < 3000) {
    const last = stats[stats.length - 1];
    if (last && last.played >= pushed && last.buffered === 0 && !last.playing) break;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  const elapsed = performance.now() - started;
  const last = stats[stats.length - 1] || {};
  const wasPlaying = stats.some((s) => s.playing);

  // Barge-in: one second of an answer, cut after about 250 ms.
  const answer = new Float32Array(24000).map((_, i) => 0.2 * Math.sin(i / 7));
  playback.port.postMessage({type: "push", samples: answer, itemId: "item_cut"}, [answer.buffer]);
  await new Promise((resolve) => setTimeout(resolve, 250));
  playback.port.postMessage({type: "flush"});
  let flushed = null;
  const cutAt = performance.now();
  while (!flushed && performance.now() - cutAt < 2000) {
    flushed = stats.find((s) => s.type === "flushed") || null;
    if (!flushed) await new Promise((resolve) => setTimeout(resolve, 20));
  }
  const afterFlush = stats[stats.length - 1] || {};
  await ctx.close();
  return {rate: ctx.sampleRate, sizes, frequency: rising / (steady.length / 24000), peak,
          played: last.played, buffered: last.buffered, wasPlaying, elapsed,
          flushed, bufferedAfterFlush: afterFlush.buffered};
}
"""


@pytest.mark.parametrize("context_rate", [48_000, 44_100, 24_000])
def test_audio_worklets_resample_to_pcm16_24k_and_play_gap_free(
    launch_browser, daphne_server_factory, context_rate
):
    # Only the page and its static files are needed here, not the realtime upstream.
    server = daphne_server_factory(DUCKE_SIMULATOR_ENABLED="0")
    page = open_page(launch_browser(), server.url)
    result = page.evaluate(
        WORKLET_CHECK,
        {
            "contextRate": context_rate,
            "captureUrl": STATIC + "audio-capture-worklet.js",
            "playbackUrl": STATIC + "audio-playback-worklet.js",
        },
    )
    assert result["rate"] == context_rate
    # 50 ms of pcm16 at 24 kHz = 1200 samples = 2400 bytes per chunk, about 14 in 700 ms.
    assert len(result["sizes"]) >= 8, result
    assert set(result["sizes"]) == {2400}, result["sizes"]
    assert result["frequency"] == pytest.approx(440, rel=0.02), result
    assert result["peak"] == pytest.approx(0.5 * 32767, rel=0.06), result
    # Every pushed sample is played, in about the time it lasts (300 ms) — no stall.
    assert result["wasPlaying"] and result["played"] == 7200 and result["buffered"] == 0, result
    assert result["elapsed"] < 1500, result
    # A flush reports how much of the interrupted item was heard, and empties the queue.
    flushed = result["flushed"]
    assert flushed and flushed["itemId"] == "item_cut" and flushed["cut"] is True, result
    assert 100 <= flushed["playedMs"] <= 600, flushed
    assert result["bufferedAfterFlush"] == 0, result
    assert_page_clean(page)


def silent_microphone(tmp_path):
    """Chromium argument for a silent fake microphone: typed questions alone drive the talk."""
    silence = write_wav(tmp_path / "silence.wav", [0.0] * 48_000)
    return f"--use-file-for-fake-audio-capture={silence}"


def ask_and_wait_for_answer(page, question):
    """Type a question and wait until the duck's answer was played and transcribed."""
    page.fill("#question", question)
    page.press("#question", "Enter")
    wait_for_data(
        page,
        "Number(d.audioChunks) > 0 && Number(d.playedSamples) > 0 && Number(d.duckTurns) > 0",
    )
    page.wait_for_selector(".turn-duck:not([aria-busy])", timeout=WAIT_MS)


def test_typed_question_gets_a_spoken_answer_and_a_transcript(
    launch_browser, voice_server, tmp_path
):
    page = open_page(launch_browser(silent_microphone(tmp_path)), voice_server.url)
    page.select_option("#voice", "coral")
    start_session(page)
    question = "My loop runs one time too many. Why?"
    try:
        ask_and_wait_for_answer(page, question)
    finally:
        page.screenshot(path=tmp_path / "duck-session.png", full_page=True)

    assert page.locator(".turn-user .text").first.inner_text() == question
    assert page.locator(".turn-duck .text").first.inner_text().strip()
    data = root_data(page)
    assert int(data["audioBytes"]) > 0 and int(data["sentChunks"]) > 0, data
    # Neither the voice choice nor anything else the page sent was refused by the relay.
    assert data["errors"] == "0", page.locator("#banner-info").inner_text()
    assert page.locator("#voice").is_disabled()  # the voice is fixed once the duck spoke

    page.click("#start")  # now labelled Stop
    wait_for_data(page, "d.state === 'closed'")
    assert page.locator("#start").inner_text() == "Start talking"
    assert page.locator("#question").is_disabled()
    assert_page_clean(page)


def test_cost_meter_shows_the_spend_after_an_answer(launch_browser, voice_server, tmp_path):
    page = open_page(launch_browser(silent_microphone(tmp_path)), voice_server.url)
    start_session(page)
    try:
        ask_and_wait_for_answer(page, "Why is my cache always empty?")
        # The relay reports the session's spend after each response (quota.status).
        wait_for_data(page, "Number(d.cost) > 0")
    finally:
        page.screenshot(path=tmp_path / "cost-meter.png", full_page=True)
    cost = page.locator("#cost").inner_text()
    assert cost == f"${root_data(page)['cost']}" and cost != "$0.0000", cost
    assert page.locator("#cap").inner_text() == "$5.00"
    minutes, seconds = page.locator("#time-left").inner_text().split(":")
    assert 0 < int(minutes) * 60 + int(seconds) <= 30 * 60
    assert_page_clean(page)


def test_spoken_question_from_the_microphone_is_answered(launch_browser, voice_server, tmp_path):
    speech = write_wav(tmp_path / "speech.wav", spoken_like_burst())
    page = open_page(
        launch_browser(f"--use-file-for-fake-audio-capture={speech}%noloop"), voice_server.url
    )
    start_session(page)
    wait_for_data(
        page,
        "Number(d.sentChunks) > 10 && Number(d.userTurns) > 0 && Number(d.audioChunks) > 0"
        " && Number(d.duckTurns) > 0",
    )
    page.screenshot(path=tmp_path / "spoken-session.png", full_page=True)
    assert page.locator(".turn-user").count() >= 1
    assert_page_clean(page)


def test_upstream_failure_close_is_explained(launch_browser, daphne_server_factory, tmp_path):
    # With the simulator switched off the relay's upstream is unreachable: close 1011.
    server = daphne_server_factory(DUCKE_SIMULATOR_ENABLED="0")
    page = open_page(launch_browser(), server.url)
    page.click("#start")
    wait_for_data(page, "d.state === 'error'")
    assert root_data(page)["closeCode"] == "1011"
    banner = page.locator("#banner-error")
    assert banner.is_visible()
    assert "voice service" in banner.inner_text()
    assert page.locator("#start").inner_text() == "Start talking"
    assert page.locator("#question").is_disabled()
    assert_page_clean(page)


def test_connection_limit_close_is_explained(launch_browser, daphne_server_factory, tmp_path):
    server = daphne_server_factory(DUCKE_SIMULATOR_ENABLED="0")
    page = open_page(launch_browser(), server.url)
    # The fresh-install rule allows 5 /session connections per minute per client.
    for attempt in range(5):
        page.click("#start")
        wait_for_data(page, "d.state === 'error'")
        assert root_data(page)["closeCode"] == "1011", attempt
    page.click("#start")
    wait_for_data(page, "d.state === 'error' && d.closeCode === '4429'")
    banner = page.locator("#banner-error")
    assert banner.is_visible()
    text = banner.inner_text()
    assert text.strip() and "voice service" not in text, text
    assert text.lower().count("try again") == 1, text
    page.screenshot(path=tmp_path / "rate-limited.png", full_page=True)
    assert_page_clean(page)


def test_talking_over_the_duck_stops_its_answer(launch_browser, voice_server, tmp_path):
    # A question, a pause for the answer to begin, then talking over the duck.
    speech = write_wav(
        tmp_path / "barge-in.wav",
        silent(0.6) + voiced(1.4) + silent(2.0) + voiced(1.2) + silent(6.0),
    )
    page = open_page(
        launch_browser(f"--use-file-for-fake-audio-capture={speech}%noloop"), voice_server.url
    )
    start_session(page)
    try:
        # The first answer is cut short: flushed locally, cancelled upstream, and truncated
        # to what was heard (the relay would report a refused truncate as an error).
        page.wait_for_selector(".turn-duck.turn-cut", timeout=WAIT_MS)
        wait_for_data(page, "Number(d.userTurns) >= 2")
    finally:
        page.screenshot(path=tmp_path / "barge-in.png", full_page=True)
    data = root_data(page)
    assert data["truncations"] == "1", data
    assert data["errors"] == "0", page.locator("#banner-info").inner_text()
    assert_page_clean(page)


def test_the_page_runs_under_its_policy_and_violations_would_be_seen(
    launch_browser, daphne_server_factory
):
    server = daphne_server_factory(DUCKE_SIMULATOR_ENABLED="0")
    page = open_page(launch_browser(), server.url)
    page.wait_for_load_state("load")
    response = page.request.get(f"{server.url}/")
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp and f"ws://127.0.0.1:{server.port}" in csp, csp
    assert response.headers["permissions-policy"].startswith("microphone=(self)")
    assert_page_clean(page)
    # The recorder itself: an inline script and a WebSocket to another port are refused.
    page.evaluate(
        """() => {
        const script = document.createElement("script");
        script.textContent = "window.inlineRan = true";
        document.body.append(script);
        try { new WebSocket("ws://127.0.0.1:9/elsewhere"); } catch (error) {}
    }"""
    )
    page.wait_for_function("() => window.__cspViolations.length >= 2", timeout=WAIT_MS)
    violations = " ".join(csp_violations(page))
    assert "script-src" in violations and "connect-src" in violations, violations
    assert page.evaluate("() => window.inlineRan") is None
