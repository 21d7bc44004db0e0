// DUCK-E answer playback: a queue of 24 kHz float chunks played gap-free at the context rate.
// Messages in: {type: "push", samples: Float32Array, itemId}, {type: "drain"}, {type: "flush"}.
// Messages out: {type: "stats", played, buffered, playing} about ten times a second, and on
// flush {type: "flushed", itemId, playedMs, cut}: how much of the item the listener heard.
"use strict";

class DuckePlaybackProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = (options && options.processorOptions) || {};
    this.sourceRate = opts.sourceRate || 24000;
    this.step = this.sourceRate / sampleRate; // source samples per output sample
    // Wait for a little audio before starting so network jitter does not cause a stutter.
    this.prebuffer = Math.round(this.sourceRate * ((opts.prebufferMs || 80) / 1000));
    this.statsEvery = Math.max(1, Math.round(sampleRate / 128 / 10));
    this.reset();
    this.played = 0;
    this.blocks = 0;
    this.port.onmessage = (event) => this.receive(event.data);
  }

  reset() {
    this.queue = [];
    this.items = [];
    this.head = null;
    this.headItem = null;
    this.itemPlayed = 0;
    this.headIndex = 0;
    this.buffered = 0;
    this.playing = false;
    this.draining = false;
    this.fraction = 0;
    this.current = 0;
    this.next = 0;
  }

  receive(message) {
    if (!message) return;
    if (message.type === "push" && message.samples && message.samples.length) {
      this.queue.push(message.samples);
      this.items.push(message.itemId || null);
      this.buffered += message.samples.length;
    } else if (message.type === "drain") {
      this.draining = true;
    } else if (message.type === "flush") {
      const heard = {
        type: "flushed",
        itemId: this.headItem,
        playedMs: Math.floor((this.itemPlayed * 1000) / this.sourceRate),
        cut: this.buffered > 0,
      };
      this.reset();
      this.port.postMessage(heard);
      this.report();
    }
  }

  take() {
    while (!this.head || this.headIndex >= this.head.length) {
      if (this.queue.length === 0) return null;
      this.head = this.queue.shift();
      const itemId = this.items.shift();
      if (itemId !== this.headItem) {
        this.headItem = itemId;
        this.itemPlayed = 0;
      }
      this.headIndex = 0;
    }
    const sample = this.head[this.headIndex];
    this.headIndex += 1;
    this.buffered -= 1;
    this.played += 1;
    this.itemPlayed += 1;
    return sample;
  }

  report() {
    this.port.postMessage({
      type: "stats",
      played: this.played,
      buffered: this.buffered,
      playing: this.playing,
    });
  }

  process(inputs, outputs) {
    const output = outputs[0];
    const channel = output[0];
    const wasPlaying = this.playing;
    if (!this.playing && (this.buffered >= this.prebuffer || (this.draining && this.buffered > 0))) {
      this.playing = true;
    }
    if (this.playing) {
      for (let i = 0; i < channel.length; i += 1) {
        channel[i] = this.current + (this.next - this.current) * this.fraction;
        this.fraction += this.step;
        while (this.fraction >= 1) {
          this.fraction -= 1;
          const sample = this.take();
          if (sample === null) {
            // Ran dry: fade to silence from the last sample and wait for more audio.
            this.current = this.next;
            this.next = 0;
            this.playing = false;
            if (this.queue.length === 0) this.draining = false;
            break;
          }
          this.current = this.next;
          this.next = sample;
        }
        if (!this.playing) {
          for (let j = i + 1; j < channel.length; j += 1) channel[j] = 0;
          break;
        }
      }
    } else {
      channel.fill(0);
    }
    for (let c = 1; c < output.length; c += 1) output[c].set(channel);
    this.blocks += 1;
    if (wasPlaying !== this.playing || this.blocks % this.statsEvery === 0) this.report();
    return true;
  }
}

registerProcessor("ducke-playback", DuckePlaybackProcessor);
