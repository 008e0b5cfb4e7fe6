// Ogg framing (RFC 3533) for one logical stream: a page muxer and a streaming page/packet demuxer.
// The protocol carries one Ogg page per WebSocket message, so pages are produced and consumed whole,
// but the demuxer also accepts arbitrary chunking (several pages per message, or pages split across messages).

const CAPTURE = [0x4f, 0x67, 0x67, 0x53]; // "OggS"
const HEADER_SIZE = 27;

export const PAGE_CONTINUED = 0x01;
export const PAGE_BOS = 0x02;
export const PAGE_EOS = 0x04;

// CRC-32 with polynomial 0x04c11db7, no reflection, initial value 0, no final xor (RFC 3533 section 6).
const CRC_TABLE = (() => {
  const table = new Uint32Array(256);
  for (let i = 0; i < 256; i++) {
    let r = i << 24;
    for (let bit = 0; bit < 8; bit++) {
      r = r & 0x80000000 ? (r << 1) ^ 0x04c11db7 : r << 1;
    }
    table[i] = r >>> 0;
  }
  return table;
})();

export function oggCrc(bytes) {
  let crc = 0;
  for (let i = 0; i < bytes.length; i++) {
    crc = ((crc << 8) ^ CRC_TABLE[((crc >>> 24) ^ bytes[i]) & 0xff]) >>> 0;
  }
  return crc >>> 0;
}

function lacingValues(length) {
  const values = [];
  let remaining = length;
  while (remaining >= 255) {
    values.push(255);
    remaining -= 255;
  }
  values.push(remaining); // a packet whose length is a multiple of 255 ends with a 0 lacing value
  return values;
}

/**
 * Builds one Ogg page holding whole packets.
 * @param {Uint8Array[]} packets packets that all end on this page
 * @param {{serial:number, sequence:number, granule:bigint|number, flags:number}} header
 * @returns {Uint8Array} the page, CRC filled in
 */
export function buildPage(packets, { serial, sequence, granule, flags }) {
  const lacing = packets.flatMap((packet) => lacingValues(packet.length));
  if (lacing.length > 255) {
    throw new Error(`an Ogg page holds at most 255 segments, these packets need ${lacing.length}`);
  }
  const bodySize = packets.reduce((sum, packet) => sum + packet.length, 0);
  const page = new Uint8Array(HEADER_SIZE + lacing.length + bodySize);
  const view = new DataView(page.buffer);
  page.set(CAPTURE, 0);
  page[4] = 0; // stream structure version
  page[5] = flags;
  view.setBigInt64(6, BigInt(granule), true);
  view.setUint32(14, serial >>> 0, true);
  view.setUint32(18, sequence >>> 0, true);
  view.setUint32(22, 0, true); // CRC is computed with this field zeroed
  page[26] = lacing.length;
  page.set(lacing, HEADER_SIZE);
  let offset = HEADER_SIZE + lacing.length;
  for (const packet of packets) {
    page.set(packet, offset);
    offset += packet.length;
  }
  view.setUint32(22, oggCrc(page), true);
  return page;
}

/**
 * Writes the pages of one logical stream: a BOS page first, sequence numbers counted, EOS on the last.
 * Granule positions are whatever the caller passes (for Opus: 48 kHz sample counts including pre-skip).
 */
export class OggWriter {
  constructor(serial = randomSerial()) {
    this.serial = serial >>> 0;
    this.sequence = 0;
    this.finished = false;
  }

  /** One page with the given whole packets. @returns {Uint8Array} */
  page(packets, granule, { last = false } = {}) {
    if (this.finished) {
      throw new Error("the Ogg stream already ended with an end-of-stream page");
    }
    let flags = 0;
    if (this.sequence === 0) flags |= PAGE_BOS;
    if (last) {
      flags |= PAGE_EOS;
      this.finished = true;
    }
    return buildPage(packets, { serial: this.serial, sequence: this.sequence++, granule, flags });
  }
}

function randomSerial() {
  const word = new Uint32Array(1);
  crypto.getRandomValues(word);
  return word[0];
}

/**
 * Streaming demuxer: feed bytes of any chunking, get complete packets of the (single) logical stream.
 * Pages with a bad CRC are dropped and counted; a packet broken by a lost page is discarded.
 */
export class OggReader {
  constructor() {
    this.pending = new Uint8Array(0);
    this.partialPacket = [];
    this.expectedSequence = null;
    this.stats = { pages: 0, packets: 0, badPages: 0, lostPages: 0 };
  }

  /**
   * @param {Uint8Array} bytes
   * @returns {{packet: Uint8Array, granule: bigint, serial: number, bos: boolean, eos: boolean}[]}
   *   packets completed by these bytes, in order; bos/eos describe the page the packet ended on
   */
  push(bytes) {
    this.pending = concat(this.pending, bytes);
    const packets = [];
    for (;;) {
      const start = findCapture(this.pending);
      if (start < 0) {
        // keep the last 3 bytes: they could be the start of a capture pattern split across chunks
        this.pending = this.pending.slice(Math.max(0, this.pending.length - 3));
        return packets;
      }
      if (start > 0) this.pending = this.pending.slice(start);
      if (this.pending.length < HEADER_SIZE) return packets;
      const segmentCount = this.pending[26];
      const headerLength = HEADER_SIZE + segmentCount;
      if (this.pending.length < headerLength) return packets;
      const lacing = this.pending.subarray(HEADER_SIZE, headerLength);
      const bodyLength = lacing.reduce((sum, value) => sum + value, 0);
      if (this.pending.length < headerLength + bodyLength) return packets;
      const page = this.pending.slice(0, headerLength + bodyLength);
      this.pending = this.pending.slice(headerLength + bodyLength);
      if (!crcMatches(page)) {
        this.stats.badPages++;
        this.partialPacket = [];
        continue;
      }
      this.readPage(page, lacing, headerLength, packets);
    }
  }

  readPage(page, lacing, headerLength, packets) {
    const view = new DataView(page.buffer, page.byteOffset, page.byteLength);
    const flags = page[5];
    const granule = view.getBigInt64(6, true);
    const serial = view.getUint32(14, true);
    const sequence = view.getUint32(18, true);
    this.stats.pages++;
    if (flags & PAGE_BOS) {
      this.partialPacket = [];
    } else if (this.expectedSequence !== null && sequence !== this.expectedSequence) {
      this.stats.lostPages++;
      this.partialPacket = [];
    }
    this.expectedSequence = (sequence + 1) >>> 0;
    // A continued page whose first packet started on a page we never saw: skip that fragment.
    let skipFragment = Boolean(flags & PAGE_CONTINUED) && this.partialPacket.length === 0;
    let offset = headerLength;
    for (const value of lacing) {
      const segment = page.subarray(offset, offset + value);
      offset += value;
      if (!skipFragment) this.partialPacket.push(segment);
      if (value < 255) {
        if (!skipFragment) {
          const packet = concat(...this.partialPacket);
          packets.push({ packet, granule, serial, bos: Boolean(flags & PAGE_BOS), eos: Boolean(flags & PAGE_EOS) });
          this.stats.packets++;
        }
        this.partialPacket = [];
        skipFragment = false;
      }
    }
  }
}

function crcMatches(page) {
  const view = new DataView(page.buffer, page.byteOffset, page.byteLength);
  const stored = view.getUint32(22, true);
  const copy = page.slice();
  copy[22] = copy[23] = copy[24] = copy[25] = 0;
  return oggCrc(copy) === stored;
}

function findCapture(bytes) {
  for (let i = 0; i + 3 < bytes.length; i++) {
    if (bytes[i] === 0x4f && bytes[i + 1] === 0x67 && bytes[i + 2] === 0x67 && bytes[i + 3] === 0x53) return i;
  }
  return -1;
}

function concat(...parts) {
  if (parts.length === 1) return parts[0];
  const total = parts.reduce((sum, part) => sum + part.length, 0);
  const out = new Uint8Array(total);
  let offset = 0;
  for (const part of parts) {
    out.set(part, offset);
    offset += part.length;
  }
  return out;
}
