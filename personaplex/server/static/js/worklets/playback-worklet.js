// Agent audio playback with a small jitter buffer. Runs on the audio rendering thread.
//
// Policy: start (and restart after an underrun) once `target` is buffered; on an underrun, fade out, count
// the missed time and raise the target by one step (up to a cap), trading a little latency for fewer gaps;
// when more than `target + slack` is buffered (a burst after a network stall), drop the oldest audio down to
// the target so that latency does not grow for the rest of the conversation.

import { StreamResampler } from "./resampler.js";

const MS = sampleRate / 1000;
const FADE_SAMPLES = Math.round(5 * MS);

class PlaybackProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const settings = options.processorOptions || {};
    this.initialTarget = Math.round((settings.targetMs ?? 100) * MS);
    this.targetStep = Math.round((settings.targetStepMs ?? 20) * MS);
    this.maxTarget = Math.round((settings.maxTargetMs ?? 400) * MS);
    this.slack = Math.round((settings.slackMs ?? 160) * MS);
    this.ring = new Float32Array(Math.round(4 * sampleRate));
    this.resamplers = new Map();
    this.reset();
    this.reportInterval = Math.round(sampleRate / 10);
    this.sinceReport = 0;
    this.port.onmessage = (event) => this.onMessage(event.data);
  }

  reset() {
    this.readIndex = 0;
    this.buffered = 0;
    this.target = this.initialTarget;
    this.playing = false;
    this.started = false; // true once any audio has played: later silence counts as missed
    this.fadeIn = 0;
    this.counters = { received: 0, played: 0, missed: 0, dropped: 0, underruns: 0, overflows: 0 };
    this.peak = 0;
    this.minBuffered = Infinity;
    this.maxBuffered = 0;
  }

  onMessage(message) {
    if (message.type === "audio") {
      let resampler = this.resamplers.get(message.sampleRate);
      if (!resampler) {
        resampler = new StreamResampler(message.sampleRate, sampleRate);
        this.resamplers.set(message.sampleRate, resampler);
      }
      this.write(resampler.process(message.samples));
    } else if (message.type === "reset") {
      this.resamplers.clear();
      this.reset();
      this.report();
    }
  }

  write(samples) {
    this.counters.received += samples.length;
    const free = this.ring.length - this.buffered;
    if (samples.length > free) this.discard(samples.length - free);
    let writeIndex = (this.readIndex + this.buffered) % this.ring.length;
    for (let i = 0; i < samples.length; i++) {
      this.ring[writeIndex] = samples[i];
      writeIndex = writeIndex + 1 === this.ring.length ? 0 : writeIndex + 1;
    }
    this.buffered += samples.length;
    if (this.buffered > this.target + this.slack) {
      this.discard(this.buffered - this.target);
      this.counters.overflows++;
    }
  }

  discard(count) {
    const dropped = Math.min(count, this.buffered);
    this.readIndex = (this.readIndex + dropped) % this.ring.length;
    this.buffered -= dropped;
    this.counters.dropped += dropped;
  }

  process(_inputs, outputs) {
    const output = outputs[0][0];
    const frames = output.length;
    if (!this.playing && this.buffered >= this.target) {
      this.playing = true;
      this.started = true;
      this.fadeIn = 0;
    }
    if (this.playing) {
      const available = Math.min(frames, this.buffered);
      for (let i = 0; i < available; i++) {
        let sample = this.ring[this.readIndex];
        this.readIndex = this.readIndex + 1 === this.ring.length ? 0 : this.readIndex + 1;
        if (this.fadeIn < FADE_SAMPLES) sample *= this.fadeIn++ / FADE_SAMPLES;
        output[i] = sample;
        const magnitude = Math.abs(sample);
        if (magnitude > this.peak) this.peak = magnitude;
      }
      this.buffered -= available;
      this.counters.played += available;
      if (available < frames) {
        // Underrun: soften the cut, then re-buffer with a larger target.
        const fade = Math.min(available, FADE_SAMPLES);
        for (let i = 0; i < fade; i++) output[available - fade + i] *= 1 - (i + 1) / fade;
        output.fill(0, available);
        this.counters.missed += frames - available;
        this.counters.underruns++;
        this.playing = false;
        this.target = Math.min(this.maxTarget, this.target + this.targetStep);
      }
    } else {
      output.fill(0);
      if (this.started) this.counters.missed += frames;
    }
    for (let channel = 1; channel < outputs[0].length; channel++) outputs[0][channel].set(output);
    this.minBuffered = Math.min(this.minBuffered, this.buffered);
    this.maxBuffered = Math.max(this.maxBuffered, this.buffered);
    this.sinceReport += frames;
    if (this.sinceReport >= this.reportInterval) this.report();
    return true;
  }

  report() {
    this.sinceReport = 0;
    const seconds = (samples) => samples / sampleRate;
    this.port.postMessage({
      type: "stats",
      playing: this.playing,
      bufferedMs: this.buffered / MS,
      targetMs: this.target / MS,
      minBufferedMs: Number.isFinite(this.minBuffered) ? this.minBuffered / MS : 0,
      maxBufferedMs: this.maxBuffered / MS,
      receivedSeconds: seconds(this.counters.received),
      playedSeconds: seconds(this.counters.played),
      missedSeconds: seconds(this.counters.missed),
      droppedSeconds: seconds(this.counters.dropped),
      underruns: this.counters.underruns,
      overflows: this.counters.overflows,
      peak: this.peak,
    });
    this.peak = 0;
    this.minBuffered = Infinity;
    this.maxBuffered = 0;
  }
}

registerProcessor("personaplex-playback", PlaybackProcessor);
