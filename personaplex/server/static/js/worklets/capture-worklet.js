// Microphone capture: takes the first input channel at the context rate, resamples it to the encoder rate and
// posts fixed-size chunks (20 ms) to the page, which encodes them. Runs on the audio rendering thread.

import { StreamResampler } from "./resampler.js";

class CaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const { targetRate, chunkSamples } = options.processorOptions;
    this.resampler = new StreamResampler(sampleRate, targetRate);
    this.chunk = new Float32Array(chunkSamples);
    this.filled = 0;
    this.capturing = true;
    this.inputSamples = 0;
    this.peak = 0;
    this.sumSquares = 0;
    this.levelSamples = 0;
    this.levelInterval = Math.round(sampleRate / 10); // report the input level ten times a second
    this.port.onmessage = (event) => this.onCommand(event.data);
  }

  onCommand(command) {
    if (command.type === "stop") {
      // Hand over what is left of the current chunk so that the encoder can finish the stream exactly.
      this.capturing = false;
      const rest = this.chunk.slice(0, this.filled);
      this.filled = 0;
      this.port.postMessage({ type: "stopped", samples: rest }, [rest.buffer]);
    }
  }

  process(inputs) {
    if (!this.capturing) return false;
    const channel = inputs[0] && inputs[0][0];
    if (!channel) return true; // no input connected yet (Firefox starts with an empty input list)
    this.inputSamples += channel.length;
    this.measure(channel);
    const resampled = this.resampler.process(channel);
    let offset = 0;
    while (offset < resampled.length) {
      const count = Math.min(resampled.length - offset, this.chunk.length - this.filled);
      this.chunk.set(resampled.subarray(offset, offset + count), this.filled);
      this.filled += count;
      offset += count;
      if (this.filled === this.chunk.length) {
        const full = this.chunk;
        this.chunk = new Float32Array(full.length);
        this.filled = 0;
        this.port.postMessage({ type: "chunk", samples: full }, [full.buffer]);
      }
    }
    return true;
  }

  measure(channel) {
    for (let i = 0; i < channel.length; i++) {
      const value = channel[i];
      this.sumSquares += value * value;
      const magnitude = Math.abs(value);
      if (magnitude > this.peak) this.peak = magnitude;
    }
    this.levelSamples += channel.length;
    if (this.levelSamples >= this.levelInterval) {
      this.port.postMessage({
        type: "level",
        rms: Math.sqrt(this.sumSquares / this.levelSamples),
        peak: this.peak,
        inputSeconds: this.inputSamples / sampleRate,
      });
      this.peak = 0;
      this.sumSquares = 0;
      this.levelSamples = 0;
    }
  }
}

registerProcessor("personaplex-capture", CaptureProcessor);
