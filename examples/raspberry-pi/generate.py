#!/usr/bin/env python3
"""Generate text from an exported GPT-S folder with onnxruntime + numpy + tokenizers only.

Made for small aarch64 boards (Raspberry Pi OS 64-bit) where installing the whole gpts-edge
package is not wanted; it reads the folders written by

    gpts-edge export --format ort  -o model-ort    (model.ort)
    gpts-edge export --format onnx -o model-onnx   (model.onnx)

Usage:
    python3 generate.py model-ort "Once upon a time" --max-new-tokens 60
    python3 generate.py model-ort "Once upon a time" --greedy --json   # token ids, for checks

Sampling here is a short temperature/top-k/top-p sampler. It is NOT bit-identical to the
project's shared sampler (gpts_edge.sampling: repetition penalty, no-repeat-ngram and its own
random stream); greedy decoding is identical everywhere, which is what scripts/pi_qemu_check.sh
compares between x86 and aarch64.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

EOT_ID = 0


def find_model(folder: Path) -> Path:
    for name in ("model.ort", "model.onnx"):
        if (folder / name).is_file():
            return folder / name
    sys.exit(f"error: {folder}: no model.ort or model.onnx (export with gpts-edge export)")


class Model:
    def __init__(self, folder: Path, threads: int = 1) -> None:
        cfg = json.loads((folder / "config.json").read_text())
        self.layers = int(cfg["num_hidden_layers"])
        self.kv_heads = int(cfg["num_key_value_heads"])
        self.head_dim = int(cfg["head_dim"])
        self.context = int(cfg["max_position_embeddings"])
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        opts = ort.SessionOptions()
        # The model is ~1.4M parameters: thread pools cost more than they save per token.
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.path = find_model(folder)
        self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in self.session.get_outputs()]

    def new_cache(self) -> tuple[list[np.ndarray], int]:
        empty = np.zeros((1, self.kv_heads, 0, self.head_dim), dtype=np.float32)
        return [empty] * (2 * self.layers), 0

    def step(self, ids: list[int], cache: tuple[list[np.ndarray], int]) -> tuple[np.ndarray, tuple]:
        past, length = cache
        n = len(ids)
        feeds = {
            "input_ids": np.asarray([ids], dtype=np.int64),
            "attention_mask": np.ones((1, length + n), dtype=np.int64),
            "position_ids": np.arange(length, length + n, dtype=np.int64)[None, :],
        }
        for i in range(self.layers):
            feeds[f"past_key_values.{i}.key"] = past[2 * i]
            feeds[f"past_key_values.{i}.value"] = past[2 * i + 1]
        out = dict(zip(self.outputs, self.session.run(None, feeds), strict=True))
        present = []
        for i in range(self.layers):
            present += [out[f"present.{i}.key"], out[f"present.{i}.value"]]
        return out["logits"][0, -1], (present, length + n)


def pick(logits: np.ndarray, rng: np.random.Generator, temperature: float, top_k: int, top_p: float) -> int:
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    if 0 < top_k < z.size:
        z[z < np.partition(z, -top_k)[-top_k]] = -np.inf
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        keep = np.cumsum(p[order]) - p[order] < top_p  # always keeps the top token
        mask = np.zeros_like(p)
        mask[order[keep]] = 1.0
        p = p * mask / (p * mask).sum()
    return int(rng.choice(p.size, p=p))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "model", type=Path, help="folder with model.ort or model.onnx, config.json, tokenizer.json"
    )
    ap.add_argument("prompt")
    ap.add_argument("--max-new-tokens", type=int, default=60)
    ap.add_argument("--greedy", action="store_true")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print token ids and timings as JSON")
    args = ap.parse_args()

    m = Model(args.model, args.threads)
    prompt_ids = m.tokenizer.encode(args.prompt).ids
    if not prompt_ids:
        sys.exit("error: prompt: expected at least one token, found an empty prompt")
    budget = min(args.max_new_tokens, m.context - len(prompt_ids))
    rng = np.random.default_rng(args.seed)
    temperature = 0.0 if args.greedy else args.temperature

    t0 = time.perf_counter()
    logits, cache = m.step(prompt_ids, m.new_cache())
    t_prefill = time.perf_counter() - t0
    new: list[int] = []
    shown = 0
    t1 = time.perf_counter()
    while len(new) < budget:
        tok = pick(logits, rng, temperature, args.top_k, args.top_p)
        if tok == EOT_ID:
            break
        new.append(tok)
        if not args.json:
            # Re-decode everything and print the new suffix: one token can hold half of a UTF-8
            # character, which decodes to U+FFFD until its other half arrives.
            text = m.tokenizer.decode(new)
            if not text.endswith("\ufffd"):
                print(text[shown:], end="", flush=True)
                shown = len(text)
        if len(new) < budget:
            logits, cache = m.step([tok], cache)
    t_decode = time.perf_counter() - t1
    tps = len(new) / t_decode if t_decode > 0 and new else 0.0
    if args.json:
        print(
            json.dumps(
                {
                    "model": m.path.name,
                    "prompt_ids": prompt_ids,
                    "tokens": new,
                    "text": m.tokenizer.decode(new),
                    "prefill_s": t_prefill,
                    "decode_tokens_per_s": tps,
                    "onnxruntime": ort.__version__,
                }
            )
        )
    else:
        print(
            f"\n[{len(new)} tokens, {tps:.1f} tokens/s, prefill {t_prefill * 1000:.1f} ms]", file=sys.stderr
        )


if __name__ == "__main__":
    main()
