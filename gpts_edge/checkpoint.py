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

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gpts_edge.config import ModelConfig
from gpts_edge.errors import GptsError
from gpts_edge.names import expected_shapes

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
GENERATION_FILE = "generation_config.json"

DEFAULT_GENERATION: dict[str, Any] = {
    "do_sample": True,
    "temperature": 0.8,
    "top_k": 0,
    "top_p": 0.95,
    "repetition_penalty": 1.1,
    "no_repeat_ngram_size": 4,
    "max_new_tokens": 80,
    "bos_token_id": 0,
    "eos_token_id": 0,
}


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
    return path.resolve()


@dataclass
class Checkpoint:
    path: Path
    config: ModelConfig
    weights: dict[str, np.ndarray]
    generation: dict[str, Any]

    @property
    def tokenizer_path(self) -> Path:
        return self.path / TOKENIZER_FILE


def load_weights(path: Path, cfg: ModelConfig) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if not path.is_file():
        raise GptsError(f"{path}: file not found (expected fp32 weights in safetensors format)")
    try:
        weights = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise GptsError(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0]})") from None
    validate_weights(weights, cfg, str(path))
    return weights


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
        data = json.loads(path.read_text())
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
    load_tokenizer(root / TOKENIZER_FILE, vocab_size=cfg.vocab_size)
    return Checkpoint(root, cfg, weights, load_generation_config(root / GENERATION_FILE))


def weights_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(Path(path) / WEIGHTS_FILE, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


def require_output_dir(parent: Path) -> None:
    """The folder an output goes into must exist, be a folder and be writable (checked before
    any work, so the error names the folder rather than a temp file deep inside a write)."""
    if not parent.exists():
        raise GptsError(f"{parent}: output directory does not exist")
    if not parent.is_dir():
        raise GptsError(f"{parent}: output location is not a directory")
    if not os.access(parent, os.W_OK):
        raise GptsError(f"{parent}: output directory is not writable")


@contextmanager
def atomic_dir(out: Path, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary directory beside ``out``; on success its files are synced and it is
    renamed to ``out`` (replacing an old one), on any error or Ctrl-C it is removed."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        # mkdtemp's 0700 would make a model folder private; honour the umask instead.
        os.chmod(tmp, _umask_mode(0o777) if mode is None else mode)
        yield tmp
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary file path beside ``path``; on success it is synced, given the usual
    umask mode and renamed to ``path``; on any error or Ctrl-C it is removed. Readers see the
    old file or the new one, never a half-written one."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        # mkstemp creates 0600; an export is meant to be shared.
        os.chmod(tmp, _umask_mode(0o666))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask_mode(base: int) -> int:
    umask = os.umask(0)
    os.umask(umask)
    return base & ~umask


def replace_dir(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``; an existing ``target`` is swapped out first, then removed.
    There is always one complete directory at ``target`` or at its ``.old`` side name."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.rename(target, old)
        os.rename(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(new, target)
