#!/usr/bin/env python3
"""Generate text from an exported GPT-S folder with onnxruntime + numpy + tokenizers only.

Made for small aarch64 boards (Raspberry Pi OS 64-bit) where installing the whole gpts-edge
package is not wanted; it reads the folders written by

    gpts-edge export --format ort  -o model-ort    (model.ort)
    gpts-edge export --format onnx -o model-onnx   (model.onnx)

Usage:
    python3 generate.py model-ort "Once upon a time" --max-new-tokens 60
    python3 generate.py model-ort "Once upon a time" --greedy --json   # token ids, for checks

Sampling follows the project's sampler (gpts_edge.sampling) step for step, with the defaults of
the folder's generation_config.json and numpy's generator, so `--seed N` gives the same text as
`gpts-edge generate --runtime onnx --seed N`. scripts/pi_qemu_check.sh compares greedy tokens
between x86 and aarch64.
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
        self.path = find_model(folder)
        for name in ("config.json", "tokenizer.json"):
            if not (folder / name).is_file():
                sys.exit(
                    f"error: {folder}: no {name} next to {self.path.name} (export with gpts-edge export)"
                )
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


def banned_ngram_tokens(history: list[int], n: int) -> set[int]:
    if n <= 0 or len(history) < n:
        return set()
    prefix = tuple(history[len(history) - n + 1 :]) if n > 1 else ()
    return {
        history[i + n - 1] for i in range(len(history) - n + 1) if tuple(history[i : i + n - 1]) == prefix
    }


def sample(logits: np.ndarray, opts: argparse.Namespace, history: list[int], u: float) -> int:
    """gpts_edge.sampling.sample, verbatim in behaviour (same order of operations, float64)."""
    x = np.asarray(logits, dtype=np.float64).copy()
    if opts.repetition_penalty != 1.0 and history:
        ids = np.unique(np.asarray(history, dtype=np.int64))
        vals = x[ids]
        x[ids] = np.where(vals > 0, vals / opts.repetition_penalty, vals * opts.repetition_penalty)
    for t in banned_ngram_tokens(history, opts.no_repeat_ngram_size):
        x[t] = -np.inf
    if opts.temperature == 0:
        return int(np.argmax(x))
    x = x / opts.temperature
    if opts.top_k and opts.top_k < len(x):
        x[x < np.partition(x, -opts.top_k)[-opts.top_k]] = -np.inf
    finite = np.isfinite(x)
    if not finite.any():
        return int(np.argmax(logits))
    p = np.zeros_like(x)
    p[finite] = np.exp(x[finite] - x[finite].max())
    p /= p.sum()
    if opts.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        keep_n = int(np.searchsorted(np.cumsum(p[order]), opts.top_p) + 1)
        keep = np.zeros_like(p, dtype=bool)
        keep[order[:keep_n]] = True
        p = np.where(keep, p, 0.0)
    cum = np.cumsum(p)
    idx = min(int(np.searchsorted(cum, u * cum[-1], side="right")), len(p) - 1)
    while p[idx] == 0 and idx > 0:
        idx -= 1
    return idx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "model", type=Path, help="folder with model.ort or model.onnx, config.json, tokenizer.json"
    )
    ap.add_argument("prompt")
    ap.add_argument("--max-new-tokens", type=int, default=60)
    ap.add_argument("--greedy", action="store_true")
    # None: take the value from the folder's generation_config.json
    ap.add_argument("--temperature", type=float)
    ap.add_argument("--top-k", type=int)
    ap.add_argument("--top-p", type=float)
    ap.add_argument("--repetition-penalty", type=float)
    ap.add_argument("--no-repeat-ngram-size", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print token ids and timings as JSON")
    args = ap.parse_args()

    m = Model(args.model, args.threads)
    prompt_ids = m.tokenizer.encode(args.prompt).ids
    if not prompt_ids:
        sys.exit("error: prompt: expected at least one token, found an empty prompt")
    gen_path = args.model / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    for key, default in (
        ("temperature", 0.8),
        ("top_k", 0),
        ("top_p", 1.0),
        ("repetition_penalty", 1.0),
        ("no_repeat_ngram_size", 0),
    ):
        if getattr(args, key) is None:
            setattr(args, key, type(default)(gen.get(key, default) or default))
    if args.greedy or gen.get("do_sample", True) is False:
        args.temperature = 0.0
    budget = min(args.max_new_tokens, m.context - len(prompt_ids))
    # numpy's generator with one draw per token: with the same --seed this picks the same tokens
    # as `gpts-edge generate --runtime onnx --seed N` (as long as the context does not fill up).
    rng = np.random.default_rng(args.seed)

    t0 = time.perf_counter()
    logits, cache = m.step(prompt_ids, m.new_cache())
    t_prefill = time.perf_counter() - t0
    new: list[int] = []
    shown = 0
    t1 = time.perf_counter()
    while len(new) < budget:
        tok = sample(logits, args, prompt_ids + new, float(rng.random()))
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
