// DUCK-E voice page: microphone -> WebSocket /session -> spoken answers, transcript and cost meter.
// The server owns the realtime session; this page only sends audio, typed questions,
// response.create/cancel and the voice choice (see DESIGN.md, "WebSocket /session").
"use strict";

(() => {
  const DEFAULT_VOICES = [
    "alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar",
  ];
  const SAMPLE_RATE = 24000;
  const CHUNK_MS = 50;
  // Stop queueing microphone audio when the socket cannot keep up (about 5 s of audio).
  const MAX_BUFFERED_BYTES = 320000;
  const VOICE_STORAGE_KEY = "ducke.voice";

  const CLOSE_MESSAGES = {
    1000: "Session ended. Press Start talking to begin a new one.",
    1001: "The server ended the session (it may be restarting). Press Start talking to reconnect.",
    1006: "The connection to DUCK-E was lost. Check your network and press Start talking to try again.",
    1009: "A message was too large for the server, so the session was ended. Press Start talking to begin again.",
    1011: "The duck lost its connection to the voice service. Please try again in a moment.",
    4402: "This session has used its whole budget. Start a new session to keep talking.",
    4408: "This session reached its time limit. Start a new session to keep talking.",
    4429: "Too many sessions from your connection right now. Please wait a minute and try again.",
    4503: "DUCK-E is paused for a while because the service reached its spending limit. Please try again later.",
  };
  const ERRORS_TO_IGNORE = new Set(["response_cancel_not_active"]);

  const root = document.getElementById("ducke");
  if (!root) return;
  const $ = (id) => document.getElementById(id);
  const ui = {
    start: $("start"),
    interrupt: $("interrupt"),
    connectionText: $("connection-text"),
    voice: $("voice"),
    micLevel: $("mic-level"),
    warning: $("banner-warning"),
    error: $("banner-error"),
    info: $("banner-info"),
    cost: $("cost"),
    cap: $("cap"),
    costBar: $("cost-bar"),
    costFill: $("cost-fill"),
    timeLeft: $("time-left"),
    transcript: $("transcript"),
    empty: $("transcript-empty"),
    form: $("ask"),
    question: $("question"),
    askButton: $("ask-button"),
  };

  // Counters exposed as data-* attributes on #ducke: cheap hooks for tests and debugging.
  const counters = {
    audioChunks: 0, audioBytes: 0, playedSamples: 0, sentChunks: 0, userTurns: 0, duckTurns: 0,
    errors: 0, truncations: 0,
  };
  function count(name, by = 1) {
    counters[name] += by;
    root.dataset[name] = String(counters[name]);
  }

  let session = null;
  let infoTimer = null;

  // ---------------------------------------------------------------- helpers

  function bytesToBase64(bytes) {
    let binary = "";
    const step = 0x8000;
    for (let i = 0; i < bytes.length; i += step) {
      binary += String.fromCharCode.apply(null, bytes.subarray(i, i + step));
    }
    return btoa(binary);
  }

  function base64ToPcmFloat(b64) {
    const binary = atob(b64);
    const frames = binary.length >> 1;
    const samples = new Float32Array(frames);
    for (let i = 0; i < frames; i += 1) {
      let value = binary.charCodeAt(2 * i) | (binary.charCodeAt(2 * i + 1) << 8);
      if (value >= 0x8000) value -= 0x10000;
      samples[i] = value / 0x8000;
    }
    return { samples, bytes: binary.length };
  }

  function formatDuration(totalSeconds) {
    const seconds = Math.max(0, Math.floor(totalSeconds));
    const minutes = Math.floor(seconds / 60);
    return `${minutes}:${String(seconds % 60).padStart(2, "0")}`;
  }

  function formatWait(seconds) {
    const s = Math.ceil(Number(seconds));
    if (!Number.isFinite(s) || s <= 0) return "";
    if (s < 90) return `${s} second${s === 1 ? "" : "s"}`;
    const minutes = Math.ceil(s / 60);
    return `${minutes} minute${minutes === 1 ? "" : "s"}`;
  }

  function withRetryHint(exceeded) {
    const text = exceeded.message || "This session reached one of its limits.";
    const wait = formatWait(exceeded.retry_after);
    // The server's message may already say when; do not say it twice.
    return wait && !/try again/i.test(text) ? `${text} You can try again in ${wait}.` : text;
  }

  function showBanner(element, text) {
    element.textContent = text;
    element.hidden = !text;
  }

  function showInfo(text) {
    showBanner(ui.info, text);
    clearTimeout(infoTimer);
    infoTimer = setTimeout(() => showBanner(ui.info, ""), 8000);
  }

  // ---------------------------------------------------------------- UI state

  const STATE_TEXT = {
    idle: "Not connected",
    connecting: "Connecting…",
    live: "Connected",
    closed: "Session ended",
    error: "Disconnected",
  };

  function setState(state, text) {
    root.dataset.state = state;
    ui.connectionText.textContent = text || STATE_TEXT[state] || state;
    const active = state === "connecting" || state === "live";
    ui.start.textContent = active ? "Stop" : "Start talking";
    ui.start.classList.toggle("btn-stop", active);
    ui.question.disabled = state !== "live";
    ui.askButton.disabled = state !== "live";
    if (!active) {
      ui.interrupt.hidden = true;
      ui.micLevel.value = 0;
      root.dataset.speaking = "false";
    }
  }

  // Shown, not announced: a screen reader user hears the duck, and a live region changing at
  // every pause in its speech would talk over it.
  function setSpeaking(speaking) {
    root.dataset.speaking = String(speaking);
  }

  function populateVoices() {
    const fromServer = (root.dataset.voices || "").split(",").filter(Boolean);
    const voices = fromServer.length ? fromServer : DEFAULT_VOICES;
    for (const voice of voices) {
      const option = document.createElement("option");
      option.value = voice;
      option.textContent = voice.charAt(0).toUpperCase() + voice.slice(1);
      ui.voice.append(option);
    }
    let saved = "";
    try {
      saved = localStorage.getItem(VOICE_STORAGE_KEY) || "";
    } catch (_) {
      // Storage can be blocked (private mode, policies): the default voice is fine.
    }
    if (voices.includes(saved)) ui.voice.value = saved;
  }

  function updateMeter(status) {
    const cost = String(status.session_cost_usd ?? "");
    const cap = String(status.session_cap_usd ?? "");
    if (cost) {
      ui.cost.textContent = `$${cost}`;
      root.dataset.cost = cost;
    }
    if (cap) ui.cap.textContent = `$${cap}`;
    // Floats only for the bar's width; the amounts shown are the server's decimal strings.
    const share = Number(cost) / Number(cap);
    if (Number.isFinite(share) && Number(cap) > 0) {
      const percent = Math.min(100, Math.max(0, share * 100));
      ui.costFill.style.width = `${percent}%`;
      ui.costBar.setAttribute("aria-valuenow", percent.toFixed(0));
      ui.costBar.classList.toggle("cost-high", percent >= 80);
    }
    const secondsLeft = Number(status.seconds_left);
    if (session && Number.isFinite(secondsLeft)) {
      session.deadline = performance.now() + secondsLeft * 1000;
      tickClock();
    }
  }

  function tickClock() {
    if (!session || session.deadline === null) return;
    ui.timeLeft.textContent = formatDuration((session.deadline - performance.now()) / 1000);
  }

  function resetMeter() {
    ui.cost.textContent = "$0.0000";
    ui.cap.textContent = "—";
    ui.timeLeft.textContent = "—";
    ui.costFill.style.width = "0%";
    ui.costBar.setAttribute("aria-valuenow", "0");
    ui.costBar.classList.remove("cost-high");
    root.dataset.cost = "";
  }

  // ---------------------------------------------------------------- transcript

  function addTurn(role, text, key) {
    if (ui.empty) {
      ui.empty.remove();
      ui.empty = null;
    }
    const item = document.createElement("li");
    item.className = `turn turn-${role}`;
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = role === "duck" ? "DUCK-E" : "You";
    const body = document.createElement("p");
    body.className = "text";
    body.textContent = text;
    item.append(who, body);
    ui.transcript.append(item);
    item.scrollIntoView({ block: "end", behavior: "smooth" });
    count(role === "duck" ? "duckTurns" : "userTurns");
    if (session && key) session.turns.set(key, item);
    return item;
  }

  function userVoiceTurn(itemId) {
    const key = `user:${itemId}`;
    return (session && session.turns.get(key)) || addTurn("user", "…", key);
  }

  function duckTurn(itemId) {
    const key = `duck:${itemId}`;
    let item = session && session.turns.get(key);
    if (!item) {
      item = addTurn("duck", "", key);
      item.setAttribute("aria-busy", "true");
    }
    return item;
  }

  function appendDuckText(itemId, delta) {
    const item = duckTurn(itemId);
    item.querySelector(".text").append(document.createTextNode(delta));
    item.scrollIntoView({ block: "end" });
  }

  function finishDuckText(itemId, transcript) {
    const item = duckTurn(itemId);
    if (typeof transcript === "string" && transcript) {
      item.querySelector(".text").textContent = transcript;
    }
    item.removeAttribute("aria-busy");
  }

  // ---------------------------------------------------------------- session

  function send(event) {
    if (!session || !session.socket || session.socket.readyState !== WebSocket.OPEN) return false;
    session.socket.send(JSON.stringify(event));
    return true;
  }

  function flushPlayback() {
    if (session && session.playback) session.playback.port.postMessage({ type: "flush" });
  }

  // Tell the model how much of its answer was actually heard before an interruption, so the
  // conversation does not claim the duck said words nobody heard.
  function truncateUnheard(current, heard) {
    if (!heard.cut || !heard.itemId || current.truncated.has(heard.itemId)) return;
    current.truncated.add(heard.itemId);
    send({
      type: "conversation.item.truncate",
      item_id: heard.itemId,
      content_index: 0,
      audio_end_ms: heard.playedMs,
    });
    count("truncations");
  }

  function sendVoice() {
    const voice = ui.voice.value;
    if (!voice || !session || session.voiceLocked) return;
    send({ type: "session.update", session: { type: "realtime", audio: { output: { voice } } } });
  }

  async function startAudio(current) {
    const AudioContextClass = window.AudioContext || window.webkitAudioContext;
    if (!AudioContextClass || !window.AudioWorkletNode) {
      throw new Error("This browser cannot play the duck's voice (no AudioWorklet support).");
    }
    // Created inside the click handler so autoplay rules allow sound.
    const context = new AudioContextClass({ latencyHint: "interactive" });
    current.context = context;
    await context.audioWorklet.addModule(root.dataset.playbackWorklet);
    await context.audioWorklet.addModule(root.dataset.captureWorklet);
    if (current !== session) return;
    const playback = new AudioWorkletNode(context, "ducke-playback", {
      numberOfInputs: 0,
      numberOfOutputs: 1,
      outputChannelCount: [1],
      processorOptions: { sourceRate: SAMPLE_RATE },
    });
    playback.port.onmessage = (event) => {
      const stats = event.data;
      if (!stats || current !== session) return;
      if (stats.type === "flushed") {
        truncateUnheard(current, stats);
        return;
      }
      if (stats.type !== "stats") return;
      root.dataset.playedSamples = String(stats.played);
      counters.playedSamples = stats.played;
      setSpeaking(Boolean(stats.playing));
    };
    playback.connect(context.destination);
    current.playback = playback;
    if (context.state === "suspended") await context.resume();

    try {
      current.stream = await navigator.mediaDevices.getUserMedia({
        audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
      });
    } catch (error) {
      showInfo(`Microphone unavailable (${error.name || error.message}). You can still type your question.`);
      return;
    }
    if (current !== session) {
      current.stream.getTracks().forEach((track) => track.stop());
      return;
    }
    const source = context.createMediaStreamSource(current.stream);
    const capture = new AudioWorkletNode(context, "ducke-capture", {
      numberOfInputs: 1,
      numberOfOutputs: 1,
      outputChannelCount: [1],
      processorOptions: { targetRate: SAMPLE_RATE, chunkMs: CHUNK_MS },
    });
    capture.port.onmessage = (event) => {
      const message = event.data;
      if (!message || message.type !== "chunk" || current !== session) return;
      ui.micLevel.value = Math.min(1, message.level * 4);
      const socket = current.socket;
      if (!socket || socket.readyState !== WebSocket.OPEN || !current.ready) return;
      if (socket.bufferedAmount > MAX_BUFFERED_BYTES) return;
      socket.send(JSON.stringify({
        type: "input_audio_buffer.append",
        audio: bytesToBase64(new Uint8Array(message.pcm)),
      }));
      count("sentChunks");
    };
    // A silent path to the output keeps the capture node pulled in every browser.
    const mute = context.createGain();
    mute.gain.value = 0;
    source.connect(capture);
    capture.connect(mute);
    mute.connect(context.destination);
    current.capture = capture;
    current.source = source;
  }

  function openSocket(current) {
    const scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
    const socket = new WebSocket(`${scheme}//${window.location.host}${root.dataset.sessionPath}`);
    current.socket = socket;
    socket.onopen = () => {
      current.opened = true;
      if (current === session) setState("connecting", "Connected, waiting for the duck…");
    };
    socket.onmessage = (event) => {
      if (current !== session) return;
      let message;
      try {
        message = JSON.parse(event.data);
      } catch (_) {
        return;
      }
      handleEvent(current, message);
    };
    socket.onclose = (event) => {
      if (current !== session) return;
      root.dataset.closeCode = String(event.code);
      const exceeded = current.exceeded;
      let text = CLOSE_MESSAGES[event.code] || `The session closed unexpectedly (code ${event.code}).`;
      if (!current.opened) text = "Could not reach DUCK-E. Check that the server is running and try again.";
      if (exceeded && exceeded.message) text = withRetryHint(exceeded);
      const clean = event.code === 1000 && !exceeded;
      // A server that closes normally says why just before (for example a long silence).
      const lastError = current.lastError;
      if (clean && lastError && lastError.message && performance.now() - lastError.at < 3000) {
        text = `${lastError.message} ${CLOSE_MESSAGES[1000]}`;
      }
      teardown();
      setState(clean ? "closed" : "error", clean ? "Session ended" : "Disconnected");
      if (clean) showInfo(text);
      else showBanner(ui.error, text);
    };
  }

  function handleEvent(current, message) {
    switch (message.type) {
      case "session.created":
        current.ready = true;
        sendVoice();
        setState("live");
        ui.question.focus({ preventScroll: true });
        break;
      case "input_audio_buffer.speech_started":
        // Barge-in: the person is talking, so the duck stops at once.
        flushPlayback();
        userVoiceTurn(message.item_id).classList.add("turn-pending");
        break;
      case "input_audio_buffer.speech_stopped":
        break;
      case "conversation.item.input_audio_transcription.completed": {
        const item = userVoiceTurn(message.item_id);
        item.querySelector(".text").textContent = message.transcript || "(no words recognised)";
        item.classList.remove("turn-pending");
        break;
      }
      case "conversation.item.input_audio_transcription.failed": {
        const item = userVoiceTurn(message.item_id);
        item.querySelector(".text").textContent = "(could not transcribe)";
        item.classList.remove("turn-pending");
        break;
      }
      case "response.created":
        current.responseActive = true;
        ui.interrupt.hidden = false;
        break;
      case "response.output_audio.delta": {
        if (!message.delta || !current.playback) break;
        const { samples, bytes } = base64ToPcmFloat(message.delta);
        current.playback.port.postMessage(
          { type: "push", samples, itemId: message.item_id }, [samples.buffer],
        );
        current.voiceLocked = true;
        ui.voice.disabled = true;
        count("audioChunks");
        count("audioBytes", bytes);
        break;
      }
      case "response.output_audio.done":
        if (current.playback) current.playback.port.postMessage({ type: "drain" });
        break;
      case "response.output_audio_transcript.delta":
      case "response.output_text.delta":
        appendDuckText(message.item_id, message.delta || "");
        break;
      case "response.output_audio_transcript.done":
        finishDuckText(message.item_id, message.transcript);
        break;
      case "response.output_text.done":
        finishDuckText(message.item_id, message.text);
        break;
      case "response.done": {
        current.responseActive = false;
        ui.interrupt.hidden = true;
        if (current.playback) current.playback.port.postMessage({ type: "drain" });
        const response = message.response || {};
        for (const output of response.output || []) {
          if (output && output.id && current.turns.has(`duck:${output.id}`)) {
            const item = current.turns.get(`duck:${output.id}`);
            item.removeAttribute("aria-busy");
            if (response.status === "cancelled") item.classList.add("turn-cut");
          }
        }
        if (response.status === "failed") {
          const detail = response.status_details && response.status_details.error;
          showInfo(`The duck could not answer${detail && detail.message ? `: ${detail.message}` : "."}`);
        }
        break;
      }
      case "quota.status":
        updateMeter(message);
        break;
      case "quota.warning":
        showBanner(ui.warning, message.message || "This session is close to one of its limits.");
        break;
      case "quota.exceeded": {
        current.exceeded = message;
        showBanner(ui.error, withRetryHint(message));
        break;
      }
      case "error": {
        const error = message.error || {};
        current.lastError = { message: error.message || "", at: performance.now() };
        count("errors");
        if (!ERRORS_TO_IGNORE.has(error.code)) showInfo(error.message || "Something went wrong.");
        break;
      }
      default:
        break;
    }
  }

  function teardown() {
    const current = session;
    session = null;
    if (!current) return;
    clearInterval(current.clock);
    if (current.stream) current.stream.getTracks().forEach((track) => track.stop());
    if (current.source) current.source.disconnect();
    if (current.capture) current.capture.port.onmessage = null;
    if (current.playback) {
      current.playback.port.postMessage({ type: "flush" });
      current.playback.port.onmessage = null;
    }
    if (current.context && current.context.state !== "closed") {
      current.context.close().catch(() => {});
    }
    if (current.socket && current.socket.readyState <= WebSocket.OPEN) {
      current.socket.close(1000, "stopped by the user");
    }
    for (const item of current.turns.values()) item.removeAttribute("aria-busy");
    ui.voice.disabled = false;
  }

  async function start() {
    showBanner(ui.warning, "");
    showBanner(ui.error, "");
    showBanner(ui.info, "");
    resetMeter();
    root.dataset.closeCode = "";
    const current = {
      socket: null, context: null, playback: null, capture: null, source: null, stream: null,
      opened: false, ready: false, responseActive: false, voiceLocked: false,
      exceeded: null, lastError: null, deadline: null, clock: null,
      turns: new Map(), truncated: new Set(),
    };
    session = current;
    if (ui.transcript.querySelector(".turn-user, .turn-duck")) {
      const divider = document.createElement("li");
      divider.className = "turn turn-divider";
      divider.textContent = "New session";
      ui.transcript.append(divider);
    }
    setState("connecting");
    current.clock = setInterval(tickClock, 1000);
    try {
      await startAudio(current);
    } catch (error) {
      if (current !== session) return;
      teardown();
      setState("error", "Audio unavailable");
      showBanner(ui.error, error.message || "Could not start audio in this browser.");
      return;
    }
    if (current === session) openSocket(current);
  }

  function stop() {
    teardown();
    setState("closed");
    showInfo(CLOSE_MESSAGES[1000]);
  }

  function ask(event) {
    event.preventDefault();
    const text = ui.question.value.trim();
    if (!text || !session || !session.ready) return;
    if (session.responseActive) {
      send({ type: "response.cancel" });
      flushPlayback();
    }
    const sent = send({
      type: "conversation.item.create",
      item: { type: "message", role: "user", content: [{ type: "input_text", text }] },
    });
    if (!sent) return;
    send({ type: "response.create" });
    addTurn("user", text);
    ui.question.value = "";
  }

  // ---------------------------------------------------------------- wiring

  populateVoices();
  setState("idle");
  ui.start.addEventListener("click", () => {
    if (session) stop();
    else start();
  });
  ui.interrupt.addEventListener("click", () => {
    send({ type: "response.cancel" });
    flushPlayback();
    ui.interrupt.hidden = true;
  });
  ui.voice.addEventListener("change", () => {
    try {
      localStorage.setItem(VOICE_STORAGE_KEY, ui.voice.value);
    } catch (_) {
      // Not remembered across visits; the choice still applies to this session.
    }
    if (session && session.ready) sendVoice();
  });
  ui.form.addEventListener("submit", ask);
  document.addEventListener("keydown", (event) => {
    // Escape interrupts the duck, like talking over it.
    if (event.key === "Escape" && session && session.responseActive) ui.interrupt.click();
  });
  window.addEventListener("pagehide", () => teardown());
})();
