// JavaScript port of gpts_edge/sampling.py `sample()`: the same order of operations, in
// float64 (JS numbers). Pinned to the Python sampler by tests/golden/sampling.json and by
// random cases drawn in tests/test_web_sampler.py.

export const DEFAULTS = Object.freeze({
  temperature: 0.8,
  top_k: 0,
  top_p: 0.95,
  repetition_penalty: 1.1,
  no_repeat_ngram_size: 4,
  max_new_tokens: 80,
  stop_at_eos: true,
});

/** Options from generation_config.json, as gpts_edge.generation.sampling_options reads it. */
export function optionsFromGenerationConfig(g = {}) {
  return {
    ...DEFAULTS,
    temperature: (g.do_sample ?? true) ? Number(g.temperature ?? 0.8) : 0,
    top_k: Number(g.top_k || 0),
    top_p: Number(g.top_p ?? 1.0),
    repetition_penalty: Number(g.repetition_penalty ?? 1.0),
    no_repeat_ngram_size: Number(g.no_repeat_ngram_size || 0),
    max_new_tokens: Number(g.max_new_tokens ?? 80),
  };
}

/** Throws on the values SamplingOptions rejects, with the same messages. */
export function checkOptions(o) {
  if (!(o.temperature >= 0)) throw new Error(`temperature: expected >= 0, found ${o.temperature}`);
  if (!(o.top_p > 0 && o.top_p <= 1)) throw new Error(`top-p: expected a value in (0, 1], found ${o.top_p}`);
  if (!(Number.isInteger(o.top_k) && o.top_k >= 0)) throw new Error(`top-k: expected an integer >= 0 (0 = off), found ${o.top_k}`);
  if (!(o.repetition_penalty > 0)) throw new Error(`repetition penalty: expected > 0, found ${o.repetition_penalty}`);
  if (!(Number.isInteger(o.no_repeat_ngram_size) && o.no_repeat_ngram_size >= 0)) {
    throw new Error(`no-repeat-ngram size: expected an integer >= 0, found ${o.no_repeat_ngram_size}`);
  }
  if (!(Number.isInteger(o.max_new_tokens) && o.max_new_tokens >= 0)) {
    throw new Error(`max new tokens: expected an integer >= 0, found ${o.max_new_tokens}`);
  }
  return o;
}

/** Tokens that would complete an n-gram already present in `history`. */
export function bannedNgramTokens(history, n) {
  const banned = new Set();
  if (n <= 0 || history.length < n) return banned;
  const start = history.length - n + 1;
  for (let i = 0; i + n <= history.length; i++) {
    let same = true;
    for (let j = 0; j < n - 1; j++) {
      if (history[i + j] !== history[start + j]) {
        same = false;
        break;
      }
    }
    if (same) banned.add(history[i + n - 1]);
  }
  return banned;
}

// numpy's argmax: the first maximum, and the first NaN if there is one.
function argmax(x) {
  let best = 0;
  for (let i = 0; i < x.length; i++) {
    if (Number.isNaN(x[i])) return i;
    if (x[i] > x[best]) best = i;
  }
  return best;
}

// numpy's pairwise summation of a contiguous float64 array (numpy/_core/src/umath/loops_utils.h):
// the rounding of p.sum() depends on it, and the normalised probabilities on that.
export function pairwiseSum(a, start = 0, n = a.length) {
  if (n < 8) {
    let res = -0.0;
    for (let i = 0; i < n; i++) res += a[start + i];
    return res;
  }
  if (n <= 128) {
    const r = new Float64Array(8);
    for (let j = 0; j < 8; j++) r[j] = a[start + j];
    let i = 8;
    for (; i < n - (n % 8); i += 8) {
      for (let j = 0; j < 8; j++) r[j] += a[start + i + j];
    }
    let res = (r[0] + r[1] + (r[2] + r[3])) + (r[4] + r[5] + (r[6] + r[7]));
    for (; i < n; i++) res += a[start + i];
    return res;
  }
  let n2 = Math.floor(n / 2);
  n2 -= n2 % 8;
  return pairwiseSum(a, start, n2) + pairwiseSum(a, start + n2, n - n2);
}

// The ids numpy's top-p keeps: the shortest head of the descending order (ties: lower id first)
// whose running sum reaches topP. Sorting all ids costs more than the model step, so only the ids
// with p >= tau are sorted: they are exactly the head of the full order, so the running sum over
// them is the same as numpy's cumsum as far as it goes. Lower tau until the sum reaches topP.
function topPHead(p, topP) {
  let pmax = 0;
  for (let i = 0; i < p.length; i++) if (p[i] > pmax) pmax = p[i];
  for (const tau of [pmax / 64, pmax / 2 ** 12, pmax / 2 ** 18, pmax / 2 ** 24, 0]) {
    const head = [];
    for (let i = 0; i < p.length; i++) if (p[i] >= tau) head.push(i);
    head.sort((a, b) => p[b] - p[a] || a - b);
    let cum = 0;
    for (let j = 0; j < head.length; j++) {
      cum += p[head[j]];
      if (cum >= topP) return head.slice(0, j + 1);
    }
    if (tau === 0) return head; // rounding kept the total below topP: keep everything
  }
}

/**
 * One token id from `logits` given the ids so far and a uniform draw `u` in [0, 1).
 * @param {ArrayLike<number>} logits
 * @param {object} opts temperature, top_k, top_p, repetition_penalty, no_repeat_ngram_size
 * @param {number[]} history
 * @param {number} u
 */
export function sample(logits, opts, history, u) {
  const V = logits.length;
  const x = Float64Array.from(logits);
  // 1. repetition penalty
  if (opts.repetition_penalty !== 1.0 && history.length) {
    const r = opts.repetition_penalty;
    for (const id of new Set(history)) {
      const v = x[id];
      x[id] = v > 0 ? v / r : v * r;
    }
  }
  // 2. no-repeat-ngram
  for (const t of bannedNgramTokens(history, opts.no_repeat_ngram_size)) x[t] = -Infinity;
  // everything banned: the raw argmax rather than fail
  if (!x.some(Number.isFinite)) return argmax(logits);
  // 3. greedy
  if (opts.temperature === 0) return argmax(x);
  // 4. temperature
  for (let i = 0; i < V; i++) x[i] = x[i] / opts.temperature;
  // 5. top-k (the k-th largest value stays, and so do its ties)
  if (opts.top_k && opts.top_k < V) {
    const sorted = Float64Array.from(x).sort();
    const kth = sorted[V - opts.top_k];
    for (let i = 0; i < V; i++) if (x[i] < kth) x[i] = -Infinity;
  }
  // 6. softmax
  let max = -Infinity;
  let anyFinite = false;
  for (let i = 0; i < V; i++) {
    if (Number.isFinite(x[i])) {
      anyFinite = true;
      if (x[i] > max) max = x[i];
    }
  }
  if (!anyFinite) return argmax(logits); // everything banned: the raw argmax rather than fail
  let p = new Float64Array(V);
  for (let i = 0; i < V; i++) if (Number.isFinite(x[i])) p[i] = Math.exp(x[i] - max);
  const total = pairwiseSum(p, 0, V);
  for (let i = 0; i < V; i++) p[i] /= total;
  // 7. top-p: stable sort by probability, descending; keep the shortest prefix reaching p
  if (opts.top_p < 1.0) {
    const kept = new Float64Array(V);
    for (const id of topPHead(p, opts.top_p)) kept[id] = p[id];
    p = kept;
  }
  // 8. draw: the first id whose cumulative mass exceeds u * total kept mass
  const cum = new Float64Array(V);
  let c = 0;
  for (let i = 0; i < V; i++) {
    c += p[i];
    cum[i] = c;
  }
  const target = u * cum[V - 1];
  let idx = V;
  for (let i = 0; i < V; i++) {
    if (cum[i] > target) {
      idx = i;
      break;
    }
  }
  idx = Math.min(idx, V - 1);
  while (p[idx] === 0 && idx > 0) idx--;
  return idx;
}

// numpy's np.random.default_rng(seed).random(), bit for bit: SeedSequence turns the seed into
// 128 bits of state and increment, PCG64 (XSL-RR) makes 64-bit words, random() keeps the top 53.
// So a seed gives the same draws, and with the same logits the same text, as Python's --seed.
const M32 = 0xffffffffn;
const MASK128 = (1n << 128n) - 1n;
const PCG_MULT = 0x2360ed051fc65da44385df649fccf645n;

function seedSequenceWords(seed, nWords32) {
  const mul32 = (a, b) => (a * b) & M32;
  let entropy = [];
  for (let v = BigInt(seed); v > 0n; v >>= 32n) entropy.push(v & M32);
  if (!entropy.length) entropy = [0n];
  const pool = [0n, 0n, 0n, 0n];
  let hashConst = 0x43b0d7e5n;
  const hashmix = (value) => {
    value ^= hashConst;
    hashConst = mul32(hashConst, 0x931e8875n);
    value = mul32(value, hashConst);
    return value ^ (value >> 16n);
  };
  const mix = (x, y) => {
    const r = (((0xca01f9ddn * x) & M32) - ((0x4973f715n * y) & M32)) & M32;
    return r ^ (r >> 16n);
  };
  for (let i = 0; i < 4; i++) pool[i] = hashmix(i < entropy.length ? entropy[i] : 0n);
  for (let src = 0; src < 4; src++) {
    for (let dst = 0; dst < 4; dst++) if (src !== dst) pool[dst] = mix(pool[dst], hashmix(pool[src]));
  }
  for (let src = 4; src < entropy.length; src++) {
    for (let dst = 0; dst < 4; dst++) pool[dst] = mix(pool[dst], hashmix(entropy[src]));
  }
  const words = [];
  hashConst = 0x8b51f9ddn;
  for (let i = 0; i < nWords32; i++) {
    let v = pool[i % 4] ^ hashConst;
    hashConst = mul32(hashConst, 0x58f38dedn);
    v = mul32(v, hashConst);
    words.push(v ^ (v >> 16n));
  }
  return words;
}

/** Uniform draws in [0, 1), identical to numpy's `np.random.default_rng(seed).random()`. */
export function makeRng(seed) {
  if (!(Number.isSafeInteger(seed) && seed >= 0)) throw new Error(`seed: expected an integer in 0..2^53-1, found ${seed}`);
  const w = seedSequenceWords(seed, 8);
  const u64 = (k) => w[2 * k] | (w[2 * k + 1] << 32n); // uint32 pairs read as little-endian uint64
  const initState = (u64(0) << 64n) | u64(1);
  const inc = (((u64(2) << 64n) | u64(3)) << 1n | 1n) & MASK128;
  let state = 0n;
  const step = () => {
    state = (state * PCG_MULT + inc) & MASK128;
  };
  step();
  state = (state + initState) & MASK128;
  step();
  return () => {
    step();
    const rot = state >> 122n;
    const x = ((state >> 64n) ^ state) & 0xffffffffffffffffn;
    const out = ((x >> rot) | (x << ((64n - rot) & 63n))) & 0xffffffffffffffffn;
    return Number(out >> 11n) / 2 ** 53;
  };
}
