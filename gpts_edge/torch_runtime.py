"""The PyTorch reference runtime: the model's cached forward as a ``step`` function."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpts_edge.checkpoint import load_checkpoint
from gpts_edge.model import GPTS, KVCache, weights_to_state


class TorchRuntime:
    def __init__(self, model_dir: str | Path | None = None, threads: int | None = None) -> None:
        ckpt = load_checkpoint(model_dir)
        self.path = ckpt.path
        self.config = ckpt.config
        self.generation_config = ckpt.generation
        self.tokenizer = ckpt.tokenizer
        self.model = GPTS(self.config)
        self.model.load_state_dict(weights_to_state(ckpt.weights))
        self.model.eval()
        if threads:
            torch.set_num_threads(threads)

    def new_cache(self) -> KVCache | None:
        return None

    @torch.inference_mode()
    def step(self, tokens: np.ndarray, cache: Any) -> tuple[np.ndarray, Any]:
        ids = torch.from_numpy(np.asarray(tokens, dtype=np.int64))[None]
        logits, cache = self.model(ids, cache)
        return logits[0, -1].numpy(), cache

    @torch.inference_mode()
    def forward_logits(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        """Full-sequence logits (B, T, vocab) for scoring; left padding via attention_mask."""
        ids = torch.from_numpy(np.asarray(input_ids, dtype=np.int64))
        mask = (
            None if attention_mask is None else torch.from_numpy(np.asarray(attention_mask, dtype=np.int64))
        )
        pos = None
        if mask is not None:
            pos = (mask.cumsum(-1) - 1).clamp_min(0)
        logits, _ = self.model(ids, None, position_ids=pos, attention_mask=mask)
        return logits.numpy()
