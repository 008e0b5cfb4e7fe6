// The /api/chat message framing: every message is binary, byte 0 is the kind, the rest the payload.

export const Kind = Object.freeze({
  HANDSHAKE: 0x00,
  AUDIO: 0x01, // one Ogg page of an Ogg Opus stream, 24 kHz mono
  TEXT: 0x02, // UTF-8 of one text piece of the agent; word starts carry a leading space
  CONTROL: 0x03,
  METADATA: 0x04, // UTF-8 JSON
  ERROR: 0x05, // UTF-8 text, sent before the server closes
  PING: 0x06,
});

const utf8 = new TextDecoder("utf-8");

/** @returns {Uint8Array} kind byte followed by the payload */
export function encodeMessage(kind, payload = new Uint8Array(0)) {
  const message = new Uint8Array(1 + payload.length);
  message[0] = kind;
  message.set(payload, 1);
  return message;
}

/**
 * @param {ArrayBuffer} data a binary WebSocket message
 * @returns {{kind:number, payload:Uint8Array, text?:string, json?:object}|null} null for an empty message
 */
export function decodeMessage(data) {
  const bytes = new Uint8Array(data);
  if (bytes.length === 0) return null;
  const kind = bytes[0];
  const payload = bytes.subarray(1);
  const message = { kind, payload };
  if (kind === Kind.TEXT || kind === Kind.ERROR || kind === Kind.METADATA) {
    message.text = utf8.decode(payload);
  }
  if (kind === Kind.METADATA) {
    try {
      message.json = JSON.parse(message.text);
    } catch {
      message.json = null;
    }
  }
  return message;
}
