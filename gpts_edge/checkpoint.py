"""Checkpoint directories in the Hugging Face layout, torch-free.

    config.json             ModelConfig (HF field names)
    model.safetensors       fp32 weights, HF llama names; the tied head is not stored
    tokenizer.json          byte-level BPE
    generation_config.json  sampling defaults

Loading uses safetensors only (never pickle) and validates everything, failing with one line
that names the file and what was expected versus found. Writes go to a temporary directory that
is renamed into place, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gpts_edge.config import ModelConfig
from gpts_edge.constants import (
    CONFIG_FILE,
    DEFAULT_GENERATION,
    GENERATION_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
)
from gpts_edge.errors import GptsError
from gpts_edge.fileio import atomic_dir, check_readable, hash_file, read_text, require_output_dir
from gpts_edge.names import expected_shapes

__all__ = [  # the file names are re-exported: checkpoint users read them from here
    "CONFIG_FILE",
    "DEFAULT_GENERATION",
    "GENERATION_FILE",
    "TOKENIZER_FILE",
    "WEIGHTS_FILE",
    "Checkpoint",
    "check_finite",
    "default_model_dir",
    "load_checkpoint",
    "load_generation_config",
    "load_weights",
    "resolve_model_dir",
    "save_checkpoint",
    "validate_weights",
    "weights_sha256",
]


def default_model_dir() -> Path:
    return Path(__file__).resolve().parent / "default_model"


def resolve_model_dir(path: str | Path | None) -> Path:
    if path is None:
        path = default_model_dir()
        if not (path / WEIGHTS_FILE).is_file():
            raise GptsError(f"{path}: the bundled default checkpoint is missing from this installation")
    path = Path(path)
    if not path.exists():
        raise GptsError(f"{path}: no such checkpoint directory")
    if not path.is_dir():
        raise GptsError(
            f"{path}: expected a checkpoint directory (config.json, model.safetensors, tokenizer.json)"
        )
    check_readable(path)
    return path.resolve()


@dataclass
class Checkpoint:
    path: Path
    config: ModelConfig
    weights: dict[str, np.ndarray]
    generation: dict[str, Any]
    tokenizer: Any = None  # the tokenizers.Tokenizer, loaded (and checked) once by load_checkpoint

    @property
    def tokenizer_path(self) -> Path:
        return self.path / TOKENIZER_FILE


def load_weights(path: Path, cfg: ModelConfig) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if not path.is_file():
        raise GptsError(f"{path}: file not found (expected fp32 weights in safetensors format)")
    check_readable(path)
    try:
        weights = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise GptsError(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0]})") from None
    validate_weights(weights, cfg, str(path))
    check_finite(weights, str(path))
    return weights


def check_finite(weights: dict[str, np.ndarray], source: str) -> None:
    """A NaN or infinity in any weight makes every logit NaN: refuse it when loading, naming the
    tensor, rather than generate nothing (or pass a parity check on NaN logits)."""
    for name, w in weights.items():
        if not np.isfinite(w).all():
            raise GptsError(f"{source}: tensor {name!r} contains NaN or infinity")


def validate_weights(weights: dict[str, Any], cfg: ModelConfig, source: str) -> None:
    expected = expected_shapes(cfg)
    missing = [n for n in expected if n not in weights]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise GptsError(f"{source}: missing tensor {missing[0]!r}{more}")
    extra = [n for n in weights if n not in expected]
    if extra:
        hint = (
            " (the head is tied to model.embed_tokens.weight and is not stored)"
            if "lm_head.weight" in extra
            else ""
        )
        raise GptsError(f"{source}: unexpected tensor {extra[0]!r}{hint}")
    for name, shape in expected.items():
        found = tuple(weights[name].shape)
        if found != shape:
            raise GptsError(f"{source}: tensor {name!r}: expected shape {list(shape)}, found {list(found)}")
        dtype = str(weights[name].dtype).replace("torch.", "")
        if dtype != "float32":
            raise GptsError(f"{source}: tensor {name!r}: expected dtype float32, found {dtype}")


def load_generation_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return dict(DEFAULT_GENERATION)
    try:
        data = json.loads(read_text(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GptsError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise GptsError(f"{path}: expected a JSON object")
    return {**DEFAULT_GENERATION, **data}


def load_checkpoint(path: str | Path | None = None) -> Checkpoint:
    from gpts_edge.tokenizer import load_tokenizer

    root = resolve_model_dir(path)
    cfg = ModelConfig.load(root / CONFIG_FILE)
    weights = load_weights(root / WEIGHTS_FILE, cfg)
    tokenizer = load_tokenizer(root / TOKENIZER_FILE, vocab_size=cfg.vocab_size)
    return Checkpoint(root, cfg, weights, load_generation_config(root / GENERATION_FILE), tokenizer)


def weights_sha256(path: str | Path) -> str:
    return hash_file(Path(path) / WEIGHTS_FILE).hexdigest()


def save_checkpoint(
    out: str | Path,
    cfg: ModelConfig,
    weights: dict[str, np.ndarray],
    tokenizer_json: str | Path,
    generation: dict[str, Any] | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Write a validated checkpoint atomically: a temp dir beside ``out``, then rename."""
    from safetensors.numpy import save_file

    out = Path(out)
    weights = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in weights.items()}
    validate_weights(weights, cfg, "weights to save")
    require_output_dir(out.parent)
    if not Path(tokenizer_json).is_file():
        raise GptsError(
            f"{tokenizer_json}: file not found (expected the tokenizer.json to save with the weights)"
        )
    with atomic_dir(out) as tmp:
        cfg.save(tmp / CONFIG_FILE)
        # Sorted keys keep the file byte-identical for identical weights.
        save_file(dict(sorted(weights.items())), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        shutil.copyfile(tokenizer_json, tmp / TOKENIZER_FILE)
        gen = {**DEFAULT_GENERATION, **(generation or {})}
        (tmp / GENERATION_FILE).write_text(json.dumps(gen, indent=2) + "\n")
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
    return out
