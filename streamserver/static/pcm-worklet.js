// AudioWorklet processor: microphone audio (the context's rate, usually 44.1 or 48 kHz) →
// 16 kHz mono signed 16-bit little-endian PCM, posted to the page in ~100 ms chunks.
//
// Downsampling: a low-pass biquad at 7 kHz, then the average of the input samples that
// fall in each output sample's interval (enough anti-aliasing for speech recognition);
// a context below 16 kHz is upsampled by holding samples.
// Message {type: "flush"} posts what is left, then {type: "flushed"}.

const TARGET_RATE = 16000;
const CHUNK = 1600; // output samples per message: 100 ms

// A second-order Butterworth low-pass (RBJ cookbook), as a function of one sample.
function biquadLowpass(cutoff, rate) {
  const w = (2 * Math.PI * cutoff) / rate;
  const alpha = Math.sin(w) / Math.SQRT2; // Q = 1/sqrt(2)
  const cos = Math.cos(w);
  const a0 = 1 + alpha;
  const b0 = (1 - cos) / 2 / a0, b1 = (1 - cos) / a0, b2 = b0;
  const a1 = (-2 * cos) / a0, a2 = (1 - alpha) / a0;
  let x1 = 0, x2 = 0, y1 = 0, y2 = 0;
  return (x) => {
    const y = b0 * x + b1 * x1 + b2 * x2 - a1 * y1 - a2 * y2;
    x2 = x1; x1 = x; y2 = y1; y1 = y;
    return y;
  };
}

class PcmDownsampler extends AudioWorkletProcessor {
  constructor() {
    super();
    this.step = sampleRate / TARGET_RATE; // input samples per output sample (>= 1 in practice)
    this.sum = 0;
    this.count = 0;
    this.last = 0;
    this.out = new Int16Array(CHUNK);
    this.filled = 0;
    this.pos = this.step; // input samples until the current output sample's interval ends
    this.lowpass = this.step > 1 ? biquadLowpass(7000, sampleRate) : null;
    this.port.onmessage = (event) => {
      if (event.data && event.data.type === "flush") {
        this.post();
        this.port.postMessage({ type: "flushed" });
      }
    };
  }

  push(value) {
    const clipped = Math.max(-1, Math.min(1, value));
    this.out[this.filled++] = clipped < 0 ? clipped * 0x8000 : clipped * 0x7fff;
    if (this.filled === CHUNK) this.post();
  }

  post() {
    if (this.filled === 0) return;
    const chunk = this.out.slice(0, this.filled); // little-endian on every platform browsers run on
    this.port.postMessage(chunk.buffer, [chunk.buffer]);
    this.filled = 0;
  }

  process(inputs) {
    const input = inputs[0];
    if (!input || input.length === 0) return true;
    const channels = input.length;
    const frames = input[0].length;
    for (let i = 0; i < frames; i++) {
      let v = 0;
      for (let c = 0; c < channels; c++) v += input[c][i];
      v /= channels;
      if (this.lowpass) v = this.lowpass(v);
      this.sum += v;
      this.count += 1;
      this.pos -= 1;
      while (this.pos <= 0) { // (more than once only if the context runs below 16 kHz)
        if (this.count > 0) {
          this.last = this.sum / this.count;
          this.sum = 0;
          this.count = 0;
        }
        this.push(this.last);
        this.pos += this.step;
      }
    }
    return true;
  }
}

registerProcessor("pcm-downsampler", PcmDownsampler);
