// Microphone -> AudioWorklet (resampled to the encoder rate) -> WebCodecs Opus encoder -> Ogg pages.
//
// The stream follows RFC 7845: a BOS page with OpusHead, a page with OpusTags, then one audio packet per page
// (20 ms, sent as soon as it is encoded), granule positions in 48 kHz units counting the pre-skip, and an
// end-of-stream page whose granule position trims the encoder's padding.

import { OggWriter } from "./ogg.js";
import { OPUS_GRANULE_RATE, isOpusHead, opusHead, opusPacketSamples, opusTags, parseOpusHead } from "./opus.js";

const PACKET_MS = 20;
const DEFAULT_PRE_SKIP = 312; // libopus look-ahead at 48 kHz, used when the encoder does not report its own
const VENDOR = "personaplex web";
const LIBOPUS_LOOKAHEADS_MS = [6.5, 2.5]; // libopus encoder delay: default and restricted low-delay modes

/**
 * The pre-skip in the 48 kHz units RFC 7845 asks for. Chromium's encoder describes its OpusHead with the
 * look-ahead counted at the encoder's own rate (156 at 24 kHz, where 312 is meant); a value that is exactly a
 * libopus look-ahead at that rate is converted, anything else is taken as already in 48 kHz units.
 */
function preSkipAt48k(preSkip, encoderRate) {
  const milliseconds = (preSkip * 1000) / encoderRate;
  const atEncoderRate = LIBOPUS_LOOKAHEADS_MS.some((lookahead) => Math.abs(milliseconds - lookahead) < 0.05);
  return atEncoderRate ? Math.round((preSkip * OPUS_GRANULE_RATE) / encoderRate) : preSkip;
}

/** Picks an Opus encoder configuration this browser supports, preferring the protocol's 24 kHz. */
export async function chooseEncoderConfig() {
  if (typeof AudioEncoder === "undefined") return null;
  for (const sampleRate of [24000, 48000]) {
    const base = { codec: "opus", sampleRate, numberOfChannels: 1, bitrate: 32000 };
    const candidates = [{ ...base, opus: { frameDuration: PACKET_MS * 1000, complexity: 5 } }, base];
    for (const config of candidates) {
      try {
        const { supported } = await AudioEncoder.isConfigSupported(config);
        if (supported) return config;
      } catch {
        // an engine that rejects the `opus` member throws instead of answering false: try the plain form
      }
    }
  }
  return null;
}

export class OpusCapture {
  /**
   * @param {AudioContext} context
   * @param {MediaStream} stream microphone
   * @param {object} config from chooseEncoderConfig()
   * @param {{onPage:(page:Uint8Array)=>void, onLevel:(level:object)=>void, onError:(error:Error)=>void}} handlers
   */
  constructor(context, stream, config, handlers) {
    this.context = context;
    this.stream = stream;
    this.config = config;
    this.handlers = handlers;
    this.rate = config.sampleRate;
    this.chunkSamples = (this.rate * PACKET_MS) / 1000;
    this.ogg = new OggWriter();
    this.preSkip = null;
    this.granule = 0;
    this.samplesIn = 0; // at the encoder rate
    this.packets = 0;
    this.bytes = 0;
    this.finishing = false;
    this.heldPackets = [];
  }

  start() {
    this.encoder = new AudioEncoder({
      output: (chunk, metadata) => this.onEncoded(chunk, metadata),
      error: (error) => this.handlers.onError(error),
    });
    this.encoder.configure(this.config);
    this.source = this.context.createMediaStreamSource(this.stream);
    this.node = new AudioWorkletNode(this.context, "personaplex-capture", {
      numberOfInputs: 1,
      numberOfOutputs: 1,
      channelCount: 1,
      channelCountMode: "explicit",
      processorOptions: { targetRate: this.rate, chunkSamples: this.chunkSamples },
    });
    this.node.port.onmessage = (event) => this.onWorkletMessage(event.data);
    this.source.connect(this.node);
    // The node writes silence; connecting it keeps it pulled by the graph in every engine.
    this.node.connect(this.context.destination);
  }

  get encodedSeconds() {
    return this.samplesIn / this.rate;
  }

  onWorkletMessage(message) {
    if (message.type === "chunk") {
      this.encode(message.samples);
    } else if (message.type === "level") {
      this.handlers.onLevel(message);
    } else if (message.type === "stopped") {
      this.onStopped?.(message.samples);
    }
  }

  encode(samples) {
    if (!this.encoder || this.encoder.state !== "configured" || samples.length === 0) return;
    const data = new AudioData({
      format: "f32-planar",
      sampleRate: this.rate,
      numberOfFrames: samples.length,
      numberOfChannels: 1,
      timestamp: Math.round((this.samplesIn / this.rate) * 1e6),
      data: samples,
    });
    this.samplesIn += samples.length;
    this.encoder.encode(data);
    data.close();
  }

  onEncoded(chunk, metadata) {
    const packet = new Uint8Array(chunk.byteLength);
    chunk.copyTo(packet);
    if (this.preSkip === null) this.writeHeaders(metadata);
    if (this.finishing) {
      this.heldPackets.push(packet);
      return;
    }
    this.writePacket(packet);
  }

  writeHeaders(metadata) {
    const description = metadata?.decoderConfig?.description;
    let preSkip = DEFAULT_PRE_SKIP;
    if (description) {
      const bytes = ArrayBuffer.isView(description)
        ? new Uint8Array(description.buffer, description.byteOffset, description.byteLength)
        : new Uint8Array(description);
      if (isOpusHead(bytes)) preSkip = preSkipAt48k(parseOpusHead(bytes).preSkip, this.rate);
    }
    this.preSkip = preSkip;
    this.granule = preSkip;
    this.send(this.ogg.page([opusHead(preSkip, this.context.sampleRate)], 0));
    this.send(this.ogg.page([opusTags(VENDOR)], 0));
  }

  writePacket(packet) {
    this.granule += opusPacketSamples(packet);
    this.packets++;
    this.send(this.ogg.page([packet], this.granule));
  }

  /**
   * Ends the stream after the flush: the packet holding the last input sample goes on the end-of-stream page,
   * whose granule position marks that sample (trimming the padding); packets after it carry only padding.
   */
  writeLastPackets(packets, inputEnd) {
    for (const packet of packets) {
      const end = this.granule + opusPacketSamples(packet);
      if (end < inputEnd && packet !== packets[packets.length - 1]) {
        this.writePacket(packet);
        continue;
      }
      const granule = Math.max(this.granule, Math.min(end, inputEnd)); // never before the previous page's
      this.granule = end;
      this.packets++;
      this.send(this.ogg.page([packet], granule, { last: true }));
      return;
    }
    this.send(this.ogg.page([], this.granule, { last: true })); // nothing came out of the flush
  }

  send(page) {
    this.bytes += page.length;
    this.handlers.onPage(page);
  }

  /** Stops capturing, encodes what is left and ends the Ogg stream with an end-of-stream page. */
  async stop() {
    if (!this.node) return;
    const rest = await new Promise((resolve) => {
      this.onStopped = resolve;
      this.node.port.postMessage({ type: "stop" });
      setTimeout(() => resolve(new Float32Array(0)), 500); // the rendering thread may already be gone
    });
    this.disconnect();
    if (!this.encoder || this.encoder.state !== "configured") return;
    this.finishing = true;
    const realSamples = this.samplesIn + rest.length;
    // Always leave at least one packet for the end-of-stream page; its granule trims this padding away.
    const padded = new Float32Array(Math.max(this.chunkSamples, rest.length));
    padded.set(rest);
    this.encode(padded);
    try {
      await this.encoder.flush();
    } catch (error) {
      this.handlers.onError(error);
      return;
    }
    this.samplesIn = realSamples;
    if (this.preSkip === null) return; // not a single packet was encoded: the stream never started
    const held = this.heldPackets;
    this.heldPackets = [];
    this.writeLastPackets(held, this.preSkip + Math.round((realSamples * OPUS_GRANULE_RATE) / this.rate));
    this.encoder.close();
  }

  disconnect() {
    this.source?.disconnect();
    this.node?.disconnect();
    this.node = null;
  }

  /** Immediate teardown without ending the stream (the connection is already gone). */
  abort() {
    this.disconnect();
    if (this.encoder && this.encoder.state !== "closed") this.encoder.close();
  }
}
