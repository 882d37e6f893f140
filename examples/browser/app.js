// Page wiring: load onnxruntime-web and the model from this server (no CDN), read the controls,
// stream tokens into the output, show tokens/s. URL parameters: ?model=URL_OF_FOLDER/,
// ?threads=N (WASM threads; >1 needs the COOP/COEP headers that `gpts-edge web` sends) and
// ?graph=full|decode (default full: model.onnx; decode: model.decode.onnx, no faster in WASM).

import * as ort from "./ort/ort.wasm.min.mjs";
import { OnnxModel } from "./model.js";
import { StreamDecoder } from "./tokenizer.js";
import { checkOptions, optionsFromGenerationConfig } from "./sampler.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const modelUrl = new URL(params.get("model") ?? "model/", location.href).href;
const threads = Number(params.get("threads") ?? 1);
const graph = params.get("graph") ?? "full";
const FIELDS = ["temperature", "top_k", "top_p", "repetition_penalty", "no_repeat_ngram_size", "max_new_tokens"];

ort.env.wasm.wasmPaths = new URL("ort/", location.href).href;
ort.env.wasm.numThreads = threads;

let model = null;
let abort = null;

function setStatus(text, error = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", error);
}

function readOptions() {
  const o = {};
  for (const f of FIELDS) o[f] = Number($(f).value);
  if ($("greedy").checked) o.temperature = 0;
  o.stop_at_eos = true;
  return checkOptions(o);
}

// "tokens/s" is what the reader sees: tokens after the first over the wall time since it (model
// steps, sampling, page updates); "model" is the model steps alone. Prefill is shown apart.
function showStats(stats, generated, firstAt) {
  const wall = performance.now() - firstAt;
  const tps = generated > 1 && wall > 0 ? (1000 * (generated - 1)) / wall : 0;
  const model = stats.decodeSteps ? (1000 * stats.decodeSteps) / stats.decodeMs : 0;
  $("stats").textContent =
    `${generated} tokens · ${tps.toFixed(1)} tokens/s (model steps alone ${model.toFixed(1)} tokens/s) · ` +
    `prefill ${stats.promptTokens} tokens in ${stats.prefillMs.toFixed(0)} ms` +
    (stats.truncated ? ` · prompt cut to its last ${stats.promptTokens} tokens (context length)` : "") +
    (stats.slid ? " · context full, window slid" : "");
}

async function onGenerate(event) {
  event.preventDefault();
  if (!model || abort) return;
  let opts;
  try {
    opts = readOptions();
  } catch (err) {
    setStatus(err.message, true);
    return;
  }
  const prompt = $("prompt").value;
  const ids = prompt ? model.tokenizer.encode(prompt) : [];
  const out = $("output");
  out.textContent = prompt;
  const gen = document.createElement("span");
  gen.className = "gen";
  out.append(gen);
  abort = new AbortController();
  $("generate").disabled = true;
  $("stop").disabled = false;
  setStatus("generating…");
  const stats = {};
  const dec = new StreamDecoder(model.tokenizer);
  let n = 0;
  let lastPaint = 0;
  let firstAt = 0;
  try {
    for await (const { token } of model.generate(ids, opts, { seed: Number($("seed").value), signal: abort.signal, stats })) {
      n += 1;
      if (n === 1) firstAt = performance.now();
      if (token === 0) break;
      gen.textContent += dec.push(token);
      // Let the page paint between tokens so the text streams instead of appearing at the end.
      if (performance.now() - lastPaint > 30) {
        showStats(stats, n, firstAt);
        await new Promise((r) => setTimeout(r, 0));
        lastPaint = performance.now();
      }
    }
    gen.textContent += dec.flush();
    showStats(stats, n, firstAt);
    setStatus(abort.signal.aborted ? "stopped" : "done");
  } catch (err) {
    setStatus(`error: ${err.message}`, true);
  } finally {
    abort = null;
    $("generate").disabled = false;
    $("stop").disabled = true;
  }
}

async function main() {
  setStatus(`loading ${modelUrl} …`);
  model = await OnnxModel.load(ort, modelUrl, {}, graph);
  const g = optionsFromGenerationConfig(model.generation);
  for (const f of FIELDS) $(f).value = g[f];
  $("greedy").checked = g.temperature === 0;
  const syncGreedy = () => ($("temperature").disabled = $("greedy").checked);
  $("greedy").addEventListener("change", syncGreedy);
  syncGreedy();
  const isolated = globalThis.crossOriginIsolated ? "cross-origin isolated" : "not isolated";
  setStatus("ready");
  $("info").textContent =
    `${model.config.num_hidden_layers} layers, vocabulary ${model.vocab}, context ${model.context} · ` +
    `${model.graph} ${(model.modelBytes / 1e6).toFixed(1)} MB · WASM, ${ort.env.wasm.numThreads} thread(s), ${isolated}`;
  $("form").addEventListener("submit", onGenerate);
  $("stop").addEventListener("click", () => abort?.abort());
  $("generate").disabled = false;
  return model;
}

// For tests and the console: the loaded model and its generation loop, driven without the UI.
window.gpts = {
  ready: main().catch((err) => {
    setStatus(`error: ${err.message}`, true);
    throw err;
  }),
  // Generate without the UI. `draws`: the uniform numbers to use, in order (default: the seeded
  // generator), so a test can hand the page and Python the same ones.
  async generate(prompt, opts, draws = null) {
    const m = await window.gpts.ready;
    const ids = prompt ? m.tokenizer.encode(prompt) : [];
    const full = checkOptions({ ...optionsFromGenerationConfig(m.generation), stop_at_eos: true, ...opts });
    const draw = draws ? () => draws.shift() : null;
    const tokens = [];
    let first = null;
    const stats = {};
    for await (const { token, logits } of m.generate(ids, full, { draw, stats })) {
      first ??= Array.from(logits);
      tokens.push(token);
    }
    return { promptIds: ids, tokens, firstLogits: first, stats };
  },
  async defaults() {
    const m = await window.gpts.ready;
    return optionsFromGenerationConfig(m.generation);
  },
  greedy(prompt, maxNewTokens) {
    const opts = { temperature: 0, top_k: 0, top_p: 1, repetition_penalty: 1, no_repeat_ngram_size: 0,
      max_new_tokens: maxNewTokens, stop_at_eos: false };
    return window.gpts.generate(prompt, opts);
  },
};
