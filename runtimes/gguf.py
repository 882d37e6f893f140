"""A GGUF file as a Runtime (numpy, no torch): read and validated by gpts_edge.gguf_format,
dequantized once, run by the numpy model in runtimes/gguf_model.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gpts_edge.errors import GptsError
from gpts_edge.gguf_format import read_gguf, tokenizer_from_json
from gpts_edge.runtimes.gguf_model import BlasThreads, KVCache, NumpyGPTS


class GGUFRuntime:
    """A GGUF file as a Runtime: dequantized once, run in numpy with a KV cache.

    ``threads``: BLAS threads for every call; by default single-token steps use one thread and
    ``forward_logits`` leaves numpy's setting alone.
    """

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        if threads is not None and threads < 1:
            raise GptsError(f"--threads: expected a positive integer, found {threads}")
        self.threads = threads
        model = read_gguf(path)
        self.path = model.path
        self.arch = model.arch
        self.config = model.config
        self.generation_config = model.generation
        self.tensor_types = model.tensor_types
        self.metadata = model.metadata
        self.tokenizer_json = model.tokenizer_json
        self.tokenizer = tokenizer_from_json(model.tokenizer_json, str(self.path), self.config.vocab_size)
        self.model = NumpyGPTS(self.config, model.weights)

    def new_cache(self) -> KVCache:
        return KVCache(self.config)

    def step(self, tokens: np.ndarray, cache: KVCache | None) -> tuple[np.ndarray, KVCache]:
        ids = np.asarray(tokens, dtype=np.int64).reshape(1, -1)
        if ids.size == 0:
            raise GptsError("step: expected at least one token")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise GptsError(
                f"step: token ids must be in [0, {self.config.vocab_size}), found {ids.min()}..{ids.max()}"
            )
        cache = cache if cache is not None else self.new_cache()
        positions = np.arange(cache.length, cache.length + ids.shape[1])[None]
        with BlasThreads(self.threads or 1):
            logits, new = self.model.forward(ids, cache.past(), positions, None)
        cache.append(new)
        return logits[0, -1], cache

    def forward_logits(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        """Full-sequence logits (B, T, vocab) for scoring; left padding via attention_mask."""
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim != 2:
            raise GptsError(f"input_ids: expected shape [batch, time], found {list(ids.shape)}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise GptsError(f"input_ids: ids must be in [0, {self.config.vocab_size})")
        if attention_mask is None:
            positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
            mask = None
        else:
            mask = np.asarray(attention_mask, dtype=np.int64)
            if mask.shape != ids.shape:
                raise GptsError(f"attention_mask: expected shape {list(ids.shape)}, found {list(mask.shape)}")
            positions = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)
        with BlasThreads(self.threads):
            logits, _ = self.model.forward(ids, None, positions, mask)
        return logits
