"""Shared fixtures for the whole suite (stable interface; other test files may rely on it).

Fixtures
--------
``tokenizer_json`` (session): Path of the bundled ``gpts_edge/default_model/tokenizer.json``
    (vocabulary 4,096, ``<|endoftext|>`` = 0). Read-only.
``tiny_checkpoint`` (session): Path of a checkpoint directory holding the ``tiny`` preset with
    XSA on, weights from ``GPTS(PRESETS["tiny"]).init_weights(0)``, and the bundled tokenizer.
    Deterministic (same bytes every run). Treat it as read-only: copy it before corrupting it.
``tiny_checkpoint_plain`` (session): the same with ``exclusive_attention=False`` (plain GQA),
    weights from ``init_weights(1)``.
``tiny_text`` (session): Path of a small English-ish text file (~40 KB) for training tests.

Helpers
-------
``make_checkpoint(out, cfg, seed)`` writes such a checkpoint anywhere (for per-test variants).
``run_cli(*args, cwd=None, timeout=...)`` runs ``python -m gpts_edge.cli ARGS`` in a subprocess
    and returns the CompletedProcess (text mode, stdout and stderr captured).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from gpts_edge.checkpoint import default_model_dir, save_checkpoint
from gpts_edge.config import PRESETS, ModelConfig

REPO = Path(__file__).resolve().parent.parent


def make_checkpoint(out: Path, cfg: ModelConfig | None = None, seed: int = 0) -> Path:
    """A seeded, untrained checkpoint in the HF layout, with the bundled tokenizer."""
    from gpts_edge.model import GPTS, state_to_weights

    cfg = cfg or PRESETS["tiny"]
    model = GPTS(cfg).init_weights(seed)
    return save_checkpoint(out, cfg, state_to_weights(model), default_model_dir() / "tokenizer.json")


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 120, env: dict | None = None):
    """``python -m gpts_edge.cli ARGS`` as a real process (exit code and stderr as a user sees them)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "gpts_edge.cli", *map(str, args)],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def tokenizer_json() -> Path:
    return default_model_dir() / "tokenizer.json"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", PRESETS["tiny"], seed=0)


@pytest.fixture(scope="session")
def tiny_checkpoint_plain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = PRESETS["tiny"].replace(exclusive_attention=False)
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-plain", cfg, seed=1)


_WORDS = tuple(
    [
        "the",
        "a",
        "small",
        "model",
        "reads",
        "words",
        "and",
        "learns",
        "which",
        "word",
        "comes",
        "next",
        "in",
        "every",
        "sentence",
        "of",
        "this",
        "tiny",
        "corpus",
        "while",
        "the",
        "trainer",
        "counts",
        "tokens",
        "steps",
        "and",
        "losses",
        "on",
        "two",
        "cores",
    ]
)


def write_text_corpus(path: Path, n_docs: int = 60, words_per_doc: int = 110, seed: int = 0) -> Path:
    """Deterministic pseudo-English documents separated by blank lines."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        words = [rng.choice(_WORDS) for _ in range(words_per_doc)]
        docs.append(" ".join(words).capitalize() + ".")
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_text_corpus(tmp_path_factory.mktemp("text") / "corpus.txt")
