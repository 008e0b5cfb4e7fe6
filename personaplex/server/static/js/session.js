// One conversation over the /api/chat WebSocket: handshake, audio both ways, text, metadata, errors.
//
// States: "connecting" (socket opening) -> "preparing" (socket open, persona being applied, or waiting for a
// free slot when metadata reports a queue position) -> "connected" (handshake received; audio flows) ->
// "closed". A server that never sends metadata (kinds 0-2 only) goes straight from "preparing" to
// "connected".

import { OpusCapture } from "./capture.js";
import { OpusPlayback } from "./playback.js";
import { Kind, decodeMessage, encodeMessage } from "./protocol.js";

const SILENCE_TIMEOUT_MS = 10000; // after the handshake, a server silent this long is considered gone

export class ChatSession {
  /**
   * @param {{url:string, context:AudioContext, microphone:MediaStream, encoderConfig:object}} options
   * @param {object} events callbacks: onState(state, detail), onText(piece), onMetadata(json), onServerError(text),
   *   onStats(stats), onClosed({code, reason, serverError, localError, wasConnected})
   */
  constructor({ url, context, microphone, encoderConfig }, events) {
    this.url = url;
    this.context = context;
    this.microphone = microphone;
    this.encoderConfig = encoderConfig;
    this.events = events;
    this.state = "idle";
    this.serverError = null;
    this.localError = null;
    this.counters = { messagesIn: 0, pagesOut: 0, textPieces: 0, unknownKinds: 0 };
    this.openedAt = 0;
    this.handshakeAt = 0;
    this.lastMessageAt = 0;
  }

  start() {
    this.playback = new OpusPlayback(this.context, {
      onStats: (stats) => {
        this.playbackBufferedMs = stats.bufferedMs;
        this.events.onStats({ playback: stats });
      },
      onError: (error) => this.fail(`Audio decoding failed: ${error.message}`),
    });
    this.playback.start();
    this.setState("connecting");
    this.openedAt = performance.now();
    let socket;
    try {
      socket = new WebSocket(this.url);
    } catch (error) {
      // a malformed address (e.g. a bad ?worker_addr=): end the same way as a failed connection
      this.localError = `Cannot connect to ${this.url.split("?")[0]}: ${error.message}`;
      this.onClose({ code: 1006, reason: "" });
      return;
    }
    socket.binaryType = "arraybuffer";
    socket.onopen = () => this.setState("preparing");
    socket.onmessage = (event) => this.onMessage(event.data);
    socket.onerror = () => {
      // Browsers give no detail here; onclose follows with the code.
    };
    socket.onclose = (event) => this.onClose(event);
    this.socket = socket;
  }

  setState(state, detail = {}) {
    this.state = state;
    this.events.onState(state, detail);
  }

  onMessage(data) {
    this.lastMessageAt = performance.now();
    this.counters.messagesIn++;
    if (typeof data === "string") {
      this.counters.unknownKinds++; // the protocol is binary only
      return;
    }
    const message = decodeMessage(data);
    if (!message) return;
    switch (message.kind) {
      case Kind.HANDSHAKE:
        this.onHandshake();
        break;
      case Kind.AUDIO:
        this.playback.push(message.payload);
        break;
      case Kind.TEXT:
        this.counters.textPieces++;
        this.events.onText(message.text);
        break;
      case Kind.METADATA:
        if (message.json) this.events.onMetadata(message.json);
        break;
      case Kind.ERROR:
        this.serverError = message.text;
        this.events.onServerError(message.text);
        break;
      default:
        this.counters.unknownKinds++; // unknown kinds are ignored, as the protocol asks
    }
  }

  onHandshake() {
    if (this.state === "connected") return;
    this.handshakeAt = performance.now();
    this.setState("connected", { handshakeMs: this.handshakeAt - this.openedAt });
    this.capture = new OpusCapture(this.context, this.microphone, this.encoderConfig, {
      onPage: (page) => this.sendAudio(page),
      onLevel: (level) => this.events.onStats({ microphone: level }),
      onError: (error) => this.fail(`Audio encoding failed: ${error.message}`),
    });
    this.capture.start();
    this.watchdog = setInterval(() => {
      if (performance.now() - this.lastMessageAt > SILENCE_TIMEOUT_MS) {
        this.fail(`The server sent nothing for ${SILENCE_TIMEOUT_MS / 1000} s; the conversation was closed.`);
      }
    }, 500);
  }

  sendAudio(page) {
    if (this.socket?.readyState !== WebSocket.OPEN) return;
    this.socket.send(encodeMessage(Kind.AUDIO, page));
    this.counters.pagesOut++;
  }

  /** Seconds of microphone audio encoded and sent so far. */
  get sentSeconds() {
    return this.capture ? this.capture.encodedSeconds : 0;
  }

  fail(text) {
    if (this.state === "closed") return;
    this.localError = text;
    this.teardown();
    this.socket?.close(1000, "client error");
  }

  /** Ends the conversation: the microphone stream gets its end-of-stream page, then the socket closes. */
  async stop() {
    if (this.state === "closed" || this.state === "closing") return;
    const wasConnected = this.state === "connected";
    this.setState("closing");
    clearInterval(this.watchdog);
    if (wasConnected && this.capture) {
      try {
        await this.capture.stop();
      } catch (error) {
        this.localError = `Could not finish the audio stream: ${error.message}`;
      }
    }
    this.socket?.close(1000, "conversation ended");
  }

  onClose(event) {
    clearInterval(this.watchdog);
    this.capture?.abort();
    this.setState("closed");
    this.events.onClosed({
      code: event.code,
      reason: event.reason,
      serverError: this.serverError,
      localError: this.localError,
      wasConnected: this.handshakeAt > 0,
    });
  }

  /** After the close: lets the agent's buffered audio (its last words) play out, at most `maxMs`. */
  async drainPlayback(maxMs = 1000) {
    const wait = Math.min(maxMs, this.playbackBufferedMs ?? 0);
    if (wait > 0) await new Promise((resolve) => setTimeout(resolve, wait));
    this.playback?.stop();
  }

  teardown() {
    clearInterval(this.watchdog);
    this.capture?.abort();
    this.playback?.stop();
  }
}
