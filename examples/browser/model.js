// The model side of the page: load an exported ONNX folder with onnxruntime-web and run the
// generation loop of gpts_edge/sampling.py `generate_tokens` (prefill in one call, then one call
// per token, the same sliding window when the context fills up).

import { ByteLevelBPE } from "./tokenizer.js";
import { makeRng, sample } from "./sampler.js";

const EOS_ID = 0;

async function fetchChecked(url, what) {
  let res;
  try {
    res = await fetch(url);
  } catch (err) {
    throw new Error(`${url}: cannot fetch ${what} (${err.message})`);
  }
  if (!res.ok) throw new Error(`${url}: cannot fetch ${what} (HTTP ${res.status})`);
  return res;
}

async function fetchJson(url, what) {
  const res = await fetchChecked(url, what);
  try {
    return await res.json();
  } catch (err) {
    throw new Error(`${url}: ${what} is not valid JSON (${err.message})`);
  }
}

async function fetchOptional(url) {
  try {
    const res = await fetch(url);
    return res.ok ? new Uint8Array(await res.arrayBuffer()) : null;
  } catch {
    return null;
  }
}

export class OnnxModel {
  // Both graphs take the cache as past_key_values.* and return it as present.*; the same names
  // as the Python side's names.py.
  async runWithCache(feeds, cache) {
    for (let i = 0; i < this.layers; i++) {
      feeds[`past_key_values.${i}.key`] = cache.kv[2 * i];
      feeds[`past_key_values.${i}.value`] = cache.kv[2 * i + 1];
    }
    const out = await this.session.run(feeds);
    const kv = [];
    for (let i = 0; i < this.layers; i++) kv.push(out[`present.${i}.key`], out[`present.${i}.value`]);
    return { out, kv };
  }

  static FILE = "model.onnx";

  /**
   * @param {object} ort the onnxruntime-web module
   * @param {string} base URL of the model folder, ending in "/"
   * @param {object} sessionOptions passed to InferenceSession.create
   * @param {string} graph "full" (model.onnx) or "decode" (model.decode.onnx; measured no faster
   *   in WASM, see docs/browser.md, so the page defaults to "full")
   */
  static async load(ort, base, sessionOptions = {}, graph = "full") {
    if (!["decode", "full"].includes(graph)) throw new Error(`graph: expected full or decode, found ${graph}`);
    const [config, tokJson, generation, bytes, decodeBytes] = await Promise.all([
      fetchJson(new URL("config.json", base), "config.json"),
      fetchJson(new URL("tokenizer.json", base), "tokenizer.json"),
      fetchJson(new URL("generation_config.json", base), "generation_config.json").catch(() => ({})),
      fetchChecked(new URL("model.onnx", base), "model.onnx").then((r) => r.arrayBuffer()),
      graph === "full" ? null : fetchOptional(new URL("model.decode.onnx", base)),
    ]);
    if (graph === "decode" && !decodeBytes) throw new Error(`${new URL("model.decode.onnx", base)}: cannot fetch the decode graph`);
    const options = { executionProviders: ["wasm"], graphOptimizationLevel: "all", logSeverityLevel: 3, ...sessionOptions };
    const tokenizer = new ByteLevelBPE(tokJson);
    if (decodeBytes) {
      // The decode graph holds no weights: it reads them from model.onnx (ONNX external data whose
      // file is model.onnx itself), so one download serves both.
      const session = await ort.InferenceSession.create(decodeBytes, {
        ...options,
        externalData: [{ path: "model.onnx", data: new Uint8Array(bytes) }],
      });
      return new DecodeModel(ort, session, config, tokenizer, generation, bytes.byteLength + decodeBytes.byteLength);
    }
    const session = await ort.InferenceSession.create(new Uint8Array(bytes), options);
    return new OnnxModel(ort, session, config, tokenizer, generation, bytes.byteLength);
  }

  constructor(ort, session, config, tokenizer, generation, modelBytes) {
    for (const key of ["num_hidden_layers", "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings"]) {
      if (!Number.isInteger(config[key])) throw new Error(`config.json: field ${key}: expected an integer, found ${JSON.stringify(config[key])}`);
    }
    this.ort = ort;
    this.session = session;
    this.config = config;
    this.tokenizer = tokenizer;
    this.generation = generation;
    this.modelBytes = modelBytes;
    this.graph = this.constructor.FILE;
    this.layers = config.num_hidden_layers;
    this.kvHeads = config.num_key_value_heads;
    this.headDim = config.head_dim;
    this.vocab = config.vocab_size;
    this.context = config.max_position_embeddings;
    const missing = this.inputs().filter((n) => !session.inputNames.includes(n));
    if (missing.length) throw new Error(`${this.graph}: missing input(s) ${missing.join(", ")} (found ${session.inputNames.join(", ")})`);
  }

  inputs() {
    return ["input_ids", "attention_mask", "position_ids", "past_key_values.0.key"];
  }

  newCache() {
    const empty = () => new this.ort.Tensor("float32", new Float32Array(0), [1, this.kvHeads, 0, this.headDim]);
    return { length: 0, kv: Array.from({ length: 2 * this.layers }, empty) };
  }

  /**
   * Feed the new token ids; returns the next-token logits (Float32Array) and the new cache.
   * @param {number[]} tokens
   */
  async step(tokens, cache) {
    const T = tokens.length;
    const past = cache.length;
    const i64 = (arr) => BigInt64Array.from(arr, (v) => BigInt(v));
    const feeds = {
      input_ids: new this.ort.Tensor("int64", i64(tokens), [1, T]),
      attention_mask: new this.ort.Tensor("int64", new BigInt64Array(past + T).fill(1n), [1, past + T]),
      position_ids: new this.ort.Tensor("int64", i64(tokens.map((_, i) => past + i)), [1, T]),
    };
    const { out, kv } = await this.runWithCache(feeds, cache);
    // CPU tensors need no dispose(): the garbage collector frees them, and a cache stays
    // usable after a step (a caller may branch from it).
    const logits = out.logits.data.slice((T - 1) * this.vocab, T * this.vocab);
    return { logits, cache: { length: past + T, kv } };
  }

  /**
   * Yield {token, logits} for each new token, like gpts_edge.sampling.generate_tokens.
   * @param {number[]} promptIds
   * @param {object} opts sampling options (see sampler.js)
   * @param {object} [run] {seed, draw, signal, stats}: `stats` is filled with timings
   */
  async *generate(promptIds, opts, { seed = 0, draw = null, signal = null, stats = {} } = {}) {
    let ids = promptIds.length ? [...promptIds] : [EOS_ID];
    const bad = ids.find((t) => !(t >= 0 && t < this.vocab));
    if (bad !== undefined) throw new Error(`token id ${bad} is outside the vocabulary (expected 0..${this.vocab - 1})`);
    const truncated = ids.length > this.context;
    if (truncated) ids = ids.slice(-this.context);
    draw ??= makeRng(seed);
    const history = [...ids];
    // stepMs keeps each decode step's time: its median shows the speed even on a busy machine.
    Object.assign(stats, { promptTokens: ids.length, truncated, prefillMs: 0, decodeMs: 0, decodeSteps: 0, stepMs: [], slid: false });
    let t0 = performance.now();
    let { logits, cache } = await this.step(ids, this.newCache());
    stats.prefillMs = performance.now() - t0;
    let filled = ids.length;
    for (let n = 0; n < opts.max_new_tokens; n++) {
      if (signal?.aborted) return;
      const token = sample(logits, opts, history, draw());
      yield { token, logits };
      history.push(token);
      if (opts.stop_at_eos !== false && token === EOS_ID) return;
      if (n === opts.max_new_tokens - 1) return; // no model step whose logits nobody reads
      t0 = performance.now();
      if (filled + 1 > this.context) {
        // At least one token: 3/4 of a context under 4 rounds to 0, and slice(-0) keeps everything.
        const keep = history.slice(-Math.max(1, Math.floor((this.context * 3) / 4)));
        stats.slid = true;
        ({ logits, cache } = await this.step(keep, this.newCache()));
        filled = keep.length;
      } else {
        ({ logits, cache } = await this.step([token], cache));
        filled += 1;
        const ms = performance.now() - t0;
        stats.decodeMs += ms;
        stats.decodeSteps += 1;
        stats.stepMs.push(ms);
      }
    }
  }
}

/**
 * The decode graph (model.decode.onnx, see docs/onnx.md): GroupQueryAttention with the lengths as
 * two int32 inputs instead of a mask and positions, and the last position's logits only.
 * Python binds one fixed-size KV buffer of the whole context and lets the graph write into it in
 * place; onnxruntime-web copies every input into WASM memory and every output out of it, so here
 * the cache grows instead, like the full graph's (GroupQueryAttention's present is then
 * cached + new positions long): copying two 384-position buffers per step made early steps
 * slower than the full graph's. Each step returns new present.* tensors; a cache stays usable.
 */
export class DecodeModel extends OnnxModel {
  static FILE = "model.decode.onnx";

  inputs() {
    return ["input_ids", "seqlens_k", "total_sequence_length", "past_key_values.0.key"];
  }

  async step(tokens, cache) {
    const T = tokens.length;
    const total = cache.length + T;
    const feeds = {
      input_ids: new this.ort.Tensor("int64", BigInt64Array.from(tokens, (v) => BigInt(v)), [1, T]),
      seqlens_k: new this.ort.Tensor("int32", Int32Array.of(total - 1), [1]),
      total_sequence_length: new this.ort.Tensor("int32", Int32Array.of(total), []),
    };
    const { out, kv } = await this.runWithCache(feeds, cache);
    return { logits: out.logits.data.slice(0, this.vocab), cache: { length: total, kv } };
  }
}
