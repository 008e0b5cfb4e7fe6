// Streaming sample-rate converter: windowed-sinc interpolation, any ratio, state kept between blocks.
// Used inside the audio worklets (capture: context rate -> 24 kHz; playback: decoder rate -> context rate).

const HALF_TAPS = 16; // 32 taps: about 0.33 ms of look-ahead at 48 kHz
const PHASES = 64; // filter table resolution between input samples; linear interpolation in between

function blackman(x) {
  // x in [-1, 1]
  return 0.42 + 0.5 * Math.cos(Math.PI * x) + 0.08 * Math.cos(2 * Math.PI * x);
}

function buildTable(cutoff) {
  const taps = 2 * HALF_TAPS;
  const table = new Float32Array((PHASES + 1) * taps);
  for (let phase = 0; phase <= PHASES; phase++) {
    const frac = phase / PHASES;
    let sum = 0;
    for (let k = 0; k < taps; k++) {
      const x = k - (HALF_TAPS - 1) - frac;
      const sinc = x === 0 ? 1 : Math.sin(Math.PI * cutoff * x) / (Math.PI * cutoff * x);
      const value = Math.abs(x) >= HALF_TAPS ? 0 : cutoff * sinc * blackman(x / HALF_TAPS);
      table[phase * taps + k] = value;
      sum += value;
    }
    for (let k = 0; k < taps; k++) table[phase * taps + k] /= sum; // unity gain at DC
  }
  return table;
}

export class StreamResampler {
  /**
   * @param {number} inputRate samples per second in
   * @param {number} outputRate samples per second out
   */
  constructor(inputRate, outputRate) {
    this.inputRate = inputRate;
    this.outputRate = outputRate;
    this.passThrough = inputRate === outputRate;
    this.step = inputRate / outputRate;
    // Below the lower Nyquist frequency, with a margin for the filter's transition band.
    this.table = this.passThrough ? null : buildTable(0.9 * Math.min(1, outputRate / inputRate));
    // History starts with zeros so that the first output sample lines up with the first input sample.
    this.history = new Float32Array(HALF_TAPS - 1);
    this.position = HALF_TAPS - 1;
  }

  /** @param {Float32Array} input @returns {Float32Array} the output samples this input completes */
  process(input) {
    if (this.passThrough) return input.slice();
    const samples = new Float32Array(this.history.length + input.length);
    samples.set(this.history, 0);
    samples.set(input, this.history.length);
    const taps = 2 * HALF_TAPS;
    const capacity = Math.ceil((samples.length - this.position) / this.step) + 1;
    const output = new Float32Array(Math.max(0, capacity));
    let produced = 0;
    let position = this.position;
    while (Math.floor(position) + HALF_TAPS < samples.length) {
      const index = Math.floor(position);
      const phaseFloat = (position - index) * PHASES;
      const phase = Math.floor(phaseFloat);
      const weight = phaseFloat - phase;
      const rowA = phase * taps;
      const rowB = rowA + taps;
      const first = index - (HALF_TAPS - 1);
      let accA = 0;
      let accB = 0;
      for (let k = 0; k < taps; k++) {
        const sample = samples[first + k];
        accA += sample * this.table[rowA + k];
        accB += sample * this.table[rowB + k];
      }
      output[produced++] = accA + (accB - accA) * weight;
      position += this.step;
    }
    const keepFrom = Math.floor(position) - (HALF_TAPS - 1);
    this.history = samples.slice(keepFrom);
    this.position = position - keepFrom;
    return output.subarray(0, produced);
  }
}
