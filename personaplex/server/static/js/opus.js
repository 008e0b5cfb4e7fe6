// Ogg Opus specifics (RFC 7845): identification and comment headers, packet durations from the TOC byte.

export const OPUS_GRANULE_RATE = 48000; // Ogg Opus granule positions always count 48 kHz samples

const ascii = (text) => new TextEncoder().encode(text);

/**
 * The identification header "OpusHead" for a mono stream (channel mapping family 0).
 * @param {number} preSkip samples at 48 kHz the decoder discards at the start
 * @param {number} inputSampleRate informational: the rate of the audio before encoding
 */
export function opusHead(preSkip, inputSampleRate) {
  const header = new Uint8Array(19);
  const view = new DataView(header.buffer);
  header.set(ascii("OpusHead"), 0);
  header[8] = 1; // version
  header[9] = 1; // channels
  view.setUint16(10, preSkip, true);
  view.setUint32(12, inputSampleRate, true);
  view.setInt16(16, 0, true); // output gain
  header[18] = 0; // mapping family
  return header;
}

/** The comment header "OpusTags" with a vendor string and no comments. */
export function opusTags(vendor) {
  const vendorBytes = ascii(vendor);
  const header = new Uint8Array(8 + 4 + vendorBytes.length + 4);
  const view = new DataView(header.buffer);
  header.set(ascii("OpusTags"), 0);
  view.setUint32(8, vendorBytes.length, true);
  header.set(vendorBytes, 12);
  view.setUint32(12 + vendorBytes.length, 0, true);
  return header;
}

function startsWith(packet, magic) {
  if (packet.length < magic.length) return false;
  for (let i = 0; i < magic.length; i++) {
    if (packet[i] !== magic.charCodeAt(i)) return false;
  }
  return true;
}

export const isOpusHead = (packet) => startsWith(packet, "OpusHead");
export const isOpusTags = (packet) => startsWith(packet, "OpusTags");

/** @returns {{channels:number, preSkip:number, inputSampleRate:number}|null} */
export function parseOpusHead(packet) {
  if (!isOpusHead(packet) || packet.length < 19) return null;
  const view = new DataView(packet.buffer, packet.byteOffset, packet.byteLength);
  return { channels: packet[9], preSkip: view.getUint16(10, true), inputSampleRate: view.getUint32(12, true) };
}

/**
 * Duration of an Opus packet in 48 kHz samples, read from its TOC byte (RFC 6716 section 3.1).
 * @returns {number} 0 for an empty or malformed packet
 */
export function opusPacketSamples(packet) {
  if (packet.length < 1) return 0;
  const toc = packet[0];
  const config = toc >> 3;
  let frameSamples;
  if (config < 12) {
    frameSamples = [480, 960, 1920, 2880][config & 3]; // SILK: 10, 20, 40, 60 ms
  } else if (config < 16) {
    frameSamples = [480, 960][config & 1]; // hybrid: 10, 20 ms
  } else {
    frameSamples = [120, 240, 480, 960][config & 3]; // CELT: 2.5, 5, 10, 20 ms
  }
  const code = toc & 3;
  let frames;
  if (code === 0) frames = 1;
  else if (code === 1 || code === 2) frames = 2;
  else if (packet.length < 2) return 0;
  else frames = packet[1] & 0x3f;
  return frames * frameSamples;
}
