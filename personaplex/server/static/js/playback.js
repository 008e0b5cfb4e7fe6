// Ogg pages from the server -> packets -> WebCodecs Opus decoder -> playback AudioWorklet (jitter buffer).

import { OggReader } from "./ogg.js";
import { OPUS_GRANULE_RATE, isOpusHead, isOpusTags, opusPacketSamples } from "./opus.js";

const DECODER_RATE = 48000; // Opus decodes at 48 kHz; the worklet converts to the context rate
const MAX_DECODE_ERRORS = 3;

export function canDecodeOpus() {
  return typeof AudioDecoder !== "undefined";
}

export class OpusPlayback {
  /**
   * @param {AudioContext} context
   * @param {{onStats:(stats:object)=>void, onError:(error:Error)=>void}} handlers
   */
  constructor(context, handlers) {
    this.context = context;
    this.handlers = handlers;
    this.reader = new OggReader();
    this.decoder = null;
    this.head = null;
    this.timestamp = 0; // microseconds of decoded audio so far
    this.packets = 0;
    this.decodeErrors = 0;
  }

  start() {
    this.node = new AudioWorkletNode(this.context, "personaplex-playback", {
      numberOfInputs: 0,
      numberOfOutputs: 1,
      outputChannelCount: [1],
      processorOptions: { targetMs: 100, targetStepMs: 20, maxTargetMs: 400, slackMs: 160 },
    });
    this.node.port.onmessage = (event) => {
      if (event.data.type === "stats") this.handlers.onStats(event.data);
    };
    this.node.connect(this.context.destination);
  }

  /** @param {Uint8Array} bytes the payload of one audio message (normally one Ogg page) */
  push(bytes) {
    for (const { packet } of this.reader.push(bytes)) {
      if (isOpusHead(packet)) {
        this.head = packet.slice();
        this.configure();
      } else if (isOpusTags(packet)) {
        // comments carry nothing the player needs
      } else if (packet.length > 0) {
        this.decode(packet);
      }
    }
  }

  configure() {
    if (this.decoder && this.decoder.state !== "closed") this.decoder.close();
    this.decoder = new AudioDecoder({
      output: (data) => this.onDecoded(data),
      error: (error) => {
        // The decoder is closed now; the next packet configures a new one. Only repeated failures end the
        // conversation: one bad packet costs 80 ms of audio, not the call.
        this.decodeErrors++;
        if (this.decodeErrors > MAX_DECODE_ERRORS) this.handlers.onError(error);
      },
    });
    const config = { codec: "opus", sampleRate: DECODER_RATE, numberOfChannels: 1 };
    if (this.head) config.description = this.head;
    this.decoder.configure(config);
  }

  decode(packet) {
    if (!this.decoder || this.decoder.state === "closed") this.configure(); // no OpusHead yet, or after an error
    const duration = opusPacketSamples(packet);
    const chunk = new EncodedAudioChunk({
      type: "key",
      timestamp: this.timestamp,
      duration: Math.round((duration * 1e6) / OPUS_GRANULE_RATE),
      data: packet,
    });
    this.timestamp += Math.round((duration * 1e6) / OPUS_GRANULE_RATE);
    this.packets++;
    this.decoder.decode(chunk);
  }

  onDecoded(data) {
    const samples = new Float32Array(data.numberOfFrames);
    data.copyTo(samples, { planeIndex: 0, format: "f32-planar" });
    const sampleRate = data.sampleRate;
    data.close();
    this.node?.port.postMessage({ type: "audio", samples, sampleRate }, [samples.buffer]);
  }

  stop() {
    if (this.decoder && this.decoder.state !== "closed") this.decoder.close();
    this.node?.disconnect();
    this.node = null;
  }
}
