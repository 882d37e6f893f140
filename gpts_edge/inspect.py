"""`gpts-edge info`: what a checkpoint holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gpts_edge.checkpoint import load_checkpoint, weights_sha256


def describe(model: str | Path | None = None) -> dict[str, Any]:
    ckpt = load_checkpoint(model)
    n_params = sum(int(w.size) for w in ckpt.weights.values())
    return {
        "checkpoint": str(ckpt.path),
        "format": "gpts checkpoint (config.json + model.safetensors + tokenizer.json)",
        "parameters": n_params,
        "vocab_size": ckpt.config.vocab_size,
        "config": ckpt.config.to_hf_dict(),
        "generation_config": ckpt.generation,
        "files": {p.name: p.stat().st_size for p in sorted(ckpt.path.iterdir()) if p.is_file()},
        "weights_sha256": weights_sha256(ckpt.path),
    }
