"""Fine-tuning a trained model on a user's own text: where the initial weights come from, the
``finetune`` preset, the validation slice held out of the user's text, and CPU batch sizing.

``--init`` accepts ``default`` (the bundled model), a checkpoint directory, a ``.gguf`` file or a
Hugging Face folder. GGUF files and HF folders go through the project's importers into
``OUT/init/`` (an ordinary checkpoint), so the weights the run starts from are on disk beside it.
Only the weights are taken, never an optimizer state.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gpts_edge.checkpoint import CONFIG_FILE, WEIGHTS_FILE, Checkpoint, load_checkpoint
from gpts_edge.config import PRESETS, ModelConfig
from gpts_edge.errors import GptsError
from gpts_edge.tokenizer import tokenizer_hash
from gpts_edge.training.data import DocumentFilter, Source, load_sources

# Sized for a laptop CPU: micro-batches of 8 x 384 (0.9 GB RSS measured). The schedule warms up
# briefly then decays linearly to zero (decay_start_frac 0). warmup 0 and eval_every 0 mean
# "sized to the run" (at most 10 warmup steps, about ten evaluations), worked out by the trainer
# once the number of steps is known. Measured on 250 KB of Jeeves, 150 steps (README, "Fine-tune
# on your own text", has the table): with independent random windows every LR (7e-4 to 1.5e-3),
# batch (8-16) and schedule cut held-out bits/byte by 13.1-14.1 %, and the levers against
# over-fitting in regularize.py did no better (EMA -13.8 %, dropout 0.1 -13.0 %, frozen
# embedding -12.8 %, decay toward the initial weights -13.2 %). Two changes did: passes over the
# text (every token once per pass, data.PassSampler) and a temperature fitted on the validation
# slice (calibrate.py; the model ends over-confident on unseen text of the domain): -14.9 % at
# LR 1e-3, -15.1 % / -14.9 % / -14.9 % (seeds 1337 / 7 / 42) at 1.25e-3, also best on a cookery text
# (-31.3 %, against -29.8 % for the old preset).
FINETUNE_TRAINING: dict[str, Any] = {
    "batch_size": 8,
    "grad_accum": 1,
    "lr": 1.25e-3,
    "warmup": 0,
    "decay_start_frac": 0.0,
    "epochs": 3.0,
    "val_fraction": 0.05,
    "keep": "best",
    "calibrate": True,
    "sampling": "passes",
    "log_every": 1,
    "eval_every": 0,
    "eval_windows": 16,
    "ckpt_every": 1_000_000_000,  # snapshots by time (ckpt_seconds) and at the end
}
EVALS_PER_RUN = 10
MIN_WINDOW = 8  # tokens; a text shorter than this (after the held-out part) cannot train


@dataclass
class InitModel:
    """The weights a run starts from, with the config and tokenizer that come with them."""

    source: str
    checkpoint: Checkpoint

    @property
    def config(self) -> ModelConfig:
        return self.checkpoint.config

    @property
    def tokenizer_json(self) -> Path:
        return self.checkpoint.tokenizer_path


def _is_checkpoint_dir(path: Path) -> bool:
    """A transformers folder (it has tokenizer_config.json, or a config.json that is not ours)
    goes through the HF importer, which also takes fp16/bf16 weights and checks the tied head."""
    if not (path / CONFIG_FILE).is_file() or (path / "tokenizer_config.json").is_file():
        return False
    try:
        ModelConfig.load(path / CONFIG_FILE)
    except GptsError:
        return False
    return True


def resolve_init(init: str, out: Path) -> InitModel:
    """``default`` | checkpoint dir | ``.gguf`` file | HF folder -> a loaded checkpoint."""
    if init == "default":
        return InitModel(init, load_checkpoint(None))
    path = Path(init)
    if not path.exists():
        raise GptsError(
            f"--init {init}: no such file or directory "
            "(expected 'default', a checkpoint directory, a .gguf file or a Hugging Face folder)"
        )
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise GptsError(
                f"--init {init}: expected a .gguf file, a checkpoint directory or a Hugging Face folder"
            )
        from gpts_edge.export.gguf import import_gguf

        return InitModel(init, load_checkpoint(import_gguf(path, out / "init")))
    if _is_checkpoint_dir(path) and (path / WEIGHTS_FILE).is_file():
        return InitModel(init, load_checkpoint(path))
    from gpts_edge.export.hf import import_hf

    return InitModel(init, load_checkpoint(import_hf(path, out / "init")))


def check_init_conflicts(init: InitModel, preset: str, tokenizer: str | None) -> None:
    """With --init the model config and tokenizer come from the initial model; a --preset or
    --tokenizer that says otherwise is an error naming both."""
    if preset in PRESETS and PRESETS[preset] != init.config:
        diff = [
            f"{k} {getattr(PRESETS[preset], k)} vs {getattr(init.config, k)}"
            for k in init.config.__dataclass_fields__
            if getattr(PRESETS[preset], k) != getattr(init.config, k)
        ]
        raise GptsError(
            f"--preset {preset} conflicts with --init {init.source}: different model config "
            f"({', '.join(diff[:3])}); drop --preset to use the initial model's config"
        )
    if tokenizer is not None:
        if not Path(tokenizer).is_file():
            raise GptsError(f"--tokenizer {tokenizer}: file not found")
        if tokenizer_hash(tokenizer) != tokenizer_hash(init.tokenizer_json):
            raise GptsError(
                f"--tokenizer {tokenizer} conflicts with --init {init.source}: a different tokenizer "
                f"than {init.tokenizer_json}; drop --tokenizer to use the initial model's"
            )


def user_text_sources(
    specs: list[str],
    tokenizer_json: Path,
    cache_dir: Path,
    seq_len: int,
    val_fraction: float,
    eval_windows: int,
    warn: Callable[[str], None],
    doc_filter: DocumentFilter | None = None,
) -> tuple[list[Source], int, np.ndarray]:
    """Sources whose last ``val_fraction`` of tokens is held out for validation.

    Returns the sources (train = the rest), the window length to train on (shorter than the
    context, with a warning, when the text is) and the validation windows [N, L + 1].
    """
    if not 0.0 < val_fraction < 0.5:
        raise GptsError(f"--val-fraction: expected a number in (0, 0.5), found {val_fraction}")
    sources = load_sources(specs, tokenizer_json, cache_dir, seq_len, doc_filter, check_length=False)
    split = []
    for s in sources:
        # The cache holds one document in 100 apart; for a fine-tune the held-out part is the
        # tail of the user's text instead (a contiguous slice never trained on).
        tokens = np.concatenate([s.train, s.val])
        n_val = max(2, int(round(len(tokens) * val_fraction)))
        train = tokens[: len(tokens) - n_val]
        if len(train) < MIN_WINDOW + 2:
            raise GptsError(
                f"--data {s.name}: only {len(tokens)} tokens ({n_val} held out for validation); "
                f"need at least {MIN_WINDOW + 2 + n_val}"
            )
        split.append(Source(s.name, s.weight, train, tokens[len(tokens) - n_val :]))
    shortest = min(len(s.train) for s in split)
    if shortest < seq_len + 2:
        warn(
            f"warning: the training text has only {shortest} tokens, less than one window of {seq_len}; "
            f"training on windows of {shortest - 2} tokens"
        )
        seq_len = shortest - 2
    return split, seq_len, holdout_windows(split, seq_len, eval_windows)


def holdout_windows(sources: list[Source], seq_len: int, max_windows: int) -> np.ndarray:
    """Consecutive windows of the held-out slices (one length for all, so they stack), shared out
    by the mixing weights; a short held-out slice gives shorter windows, never training tokens."""
    length = min(seq_len, *(len(s.val) - 1 for s in sources))
    total_w = sum(s.weight for s in sources)
    rows = []
    for s in sources:
        n = max(1, int(round(max_windows * s.weight / total_w)))
        avail = (len(s.val) - 1) // length
        rows += [s.val[k * length : k * length + length + 1].astype(np.int64) for k in range(min(n, avail))]
    return np.stack(rows)


def steps_for_epochs(epochs: float, sources: list[Source], tokens_per_step: int) -> int:
    if not epochs > 0:
        raise GptsError(f"--epochs: expected a positive number, found {epochs}")
    return max(1, math.ceil(epochs * sum(len(s.train) for s in sources) / tokens_per_step))


def cpu_micro_batch(batch_size: int, grad_accum: int, limit: int) -> tuple[int, int]:
    """The same sequences per step as micro-batches of at most ``limit`` (a divisor of the batch,
    so the optimizer sees exactly the batch it would on a GPU) with more accumulation."""
    if limit <= 0 or batch_size <= limit:
        return batch_size, grad_accum
    micro = max(d for d in range(1, limit + 1) if batch_size % d == 0)
    return micro, grad_accum * (batch_size // micro)
