// DUCK-E microphone capture: float samples at the context rate -> pcm16 24 kHz mono LE chunks.
// Runs in the AudioWorkletGlobalScope, where `sampleRate` is the AudioContext's rate.
"use strict";

class DuckeCaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = (options && options.processorOptions) || {};
    this.targetRate = opts.targetRate || 24000;
    this.chunkSamples = Math.round((this.targetRate * (opts.chunkMs || 50)) / 1000);
    // Input samples per output sample; 2 at 48 kHz, 1.8375 at 44.1 kHz, 1 at 24 kHz.
    this.step = sampleRate / this.targetRate;
    this.position = 0; // where the next output sample falls, in input samples; -1 is `previous`
    this.previous = 0;
    // Two one-pole low-pass stages keep most energy above the new Nyquist out of the result.
    const cutoff = Math.min(0.45 * this.targetRate, 0.45 * sampleRate);
    this.alpha = this.step > 1.01 ? 1 - Math.exp((-2 * Math.PI * cutoff) / sampleRate) : 1;
    this.stage1 = 0;
    this.stage2 = 0;
    this.startChunk();
    this.port.onmessage = (event) => {
      if (event.data && event.data.type === "flush") this.flush();
    };
  }

  startChunk() {
    this.bytes = new ArrayBuffer(this.chunkSamples * 2);
    this.view = new DataView(this.bytes);
    this.filled = 0;
    this.sumSquares = 0;
  }

  flush() {
    if (this.filled === 0) return;
    const level = Math.sqrt(this.sumSquares / this.filled);
    const pcm = this.bytes.slice(0, this.filled * 2);
    this.port.postMessage({ type: "chunk", pcm, level }, [pcm]);
    this.startChunk();
  }

  push(sample) {
    const clamped = sample < -1 ? -1 : sample > 1 ? 1 : sample;
    this.view.setInt16(this.filled * 2, clamped < 0 ? clamped * 0x8000 : clamped * 0x7fff, true);
    this.sumSquares += clamped * clamped;
    this.filled += 1;
    if (this.filled === this.chunkSamples) {
      const level = Math.sqrt(this.sumSquares / this.filled);
      const pcm = this.bytes;
      this.port.postMessage({ type: "chunk", pcm, level }, [pcm]);
      this.startChunk();
    }
  }

  process(inputs) {
    const input = inputs[0];
    if (!input || input.length === 0 || input[0].length === 0) return true;
    const frames = input[0].length;
    const mono = input.length === 1 ? input[0] : new Float32Array(frames);
    if (input.length > 1) {
      for (let c = 0; c < input.length; c += 1) {
        const channel = input[c];
        for (let i = 0; i < frames; i += 1) mono[i] += channel[i] / input.length;
      }
    }
    const filtered = new Float32Array(frames);
    for (let i = 0; i < frames; i += 1) {
      this.stage1 += this.alpha * (mono[i] - this.stage1);
      this.stage2 += this.alpha * (this.stage1 - this.stage2);
      filtered[i] = this.stage2;
    }
    // Linear interpolation between neighbouring input samples, carried across blocks.
    let t = this.position;
    while (t < frames - 1) {
      const i = Math.floor(t);
      const frac = t - i;
      const a = i < 0 ? this.previous : filtered[i];
      const b = filtered[i + 1];
      this.push(a + (b - a) * frac);
      t += this.step;
    }
    this.position = t - frames;
    this.previous = filtered[frames - 1];
    return true;
  }
}

registerProcessor("ducke-capture", DuckeCaptureProcessor);
