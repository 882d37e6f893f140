"""Held-out loss per source of one or more models, on the trainer's prepared validation slices.

    python scripts/heldout_loss.py --cache runs/cpt/data-cache --model default --model runs/cpt [--windows 64]

Every source's ``val.bin`` (the documents the trainer holds out: 1 in 100) is cut into
non-overlapping windows of the model's context; each window is scored from its own context (the
first token of a window is not predicted). Reported per source: nats/token and bits per UTF-8
byte of the scored tokens' text, so models with the same tokenizer compare directly.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np


def _windows(val: np.ndarray, context: int, n: int) -> np.ndarray:
    usable = (len(val) // context) * context
    w = val[:usable].reshape(-1, context)
    if len(w) > n:  # spread over the whole slice rather than its first documents
        w = w[np.linspace(0, len(w) - 1, n).astype(int)]
    return w.astype(np.int64)


def score(rt, windows: np.ndarray, batch: int = 8) -> tuple[float, int, int]:
    """(total NLL in nats, tokens scored, UTF-8 bytes of those tokens)."""
    nll, tokens, nbytes = 0.0, 0, 0
    for s in range(0, len(windows), batch):
        chunk = windows[s : s + batch]
        logits = rt.forward_logits(chunk).astype(np.float64)[:, :-1]
        m = logits.max(-1, keepdims=True)
        logz = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
        tgt = chunk[:, 1:]
        nll += float((logz - np.take_along_axis(logits, tgt[..., None], -1)[..., 0]).sum())
        tokens += tgt.size
        for row in tgt:
            nbytes += len(rt.tokenizer.decode(row.tolist(), skip_special_tokens=False).encode("utf-8"))
    return nll, tokens, nbytes


def main() -> None:
    from gpts_edge.api import open_runtime

    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", required=True, help="a run's data-cache folder (prepared sources)")
    ap.add_argument("--model", action="append", required=True, help="'default' or a checkpoint folder")
    ap.add_argument("--windows", type=int, default=64)
    args = ap.parse_args()
    sources = {}
    for d in sorted(Path(args.cache).iterdir()):
        meta = json.loads((d / "meta.json").read_text())
        name = Path(meta["source"]).name.split("-")[0].split(".")[0]
        sources[name] = np.fromfile(d / "val.bin", dtype=np.uint16)
    out = {}
    for model in args.model:
        rt = open_runtime("onnx", None if model == "default" else model)
        rows = {}
        for name, val in sources.items():
            nll, n, b = score(rt, _windows(val, rt.config.context_length, args.windows))
            rows[name] = {
                "nats_per_token": round(nll / n, 4),
                "bits_per_byte": round(nll / math.log(2) / b, 4),
                "tokens": n,
            }
        out[model] = rows
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
