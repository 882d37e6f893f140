"""`gpts-edge info`: what a model path holds, for every format the project writes (checkpoint
folder, ONNX folder or .onnx file, ORT folder or .ort file, .gguf file)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gpts_edge.checkpoint import load_checkpoint, load_generation_config, weights_sha256
from gpts_edge.config import ModelConfig
from gpts_edge.constants import (
    CONFIG_FILE,
    GENERATION_FILE,
    GGUF_SUFFIX,
    ORT_MODEL_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
)
from gpts_edge.errors import GptsError
from gpts_edge.fileio import check_readable, hash_file, unreadable


def describe(model: str | Path | None = None) -> dict[str, Any]:
    p = None if model is None else Path(model)
    if p is not None and p.is_file() and p.suffix == GGUF_SUFFIX:
        return _describe_gguf(p)
    if p is not None and _is_onnx_export(p):
        return _describe_onnx(p)
    # Anything else is read as a checkpoint, whose errors name the file that is wrong.
    ckpt = load_checkpoint(model)
    n_params = sum(int(w.size) for w in ckpt.weights.values())
    return {
        "checkpoint": str(ckpt.path),
        "format": "gpts checkpoint (config.json + model.safetensors + tokenizer.json)",
        "parameters": n_params,
        "vocab_size": ckpt.config.vocab_size,
        "config": ckpt.config.to_hf_dict(),
        "generation_config": ckpt.generation,
        "files": _files(ckpt.path),
        "weights_sha256": weights_sha256(ckpt.path),
    }


def _is_onnx_export(p: Path) -> bool:
    if p.is_file():
        return p.suffix in (".onnx", ".ort")
    if not p.is_dir():
        return False
    check_readable(p)  # an unlistable folder: "cannot read", named, whatever it holds
    if (p / WEIGHTS_FILE).exists():
        return False
    return (p / ORT_MODEL_FILE).is_file() or any(p.glob("*.onnx"))


def _files(folder: Path) -> dict[str, int]:
    try:
        return {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    except OSError as exc:
        raise unreadable(folder, exc) from None


def _sha256(path: Path) -> str:
    return hash_file(path).hexdigest()


def _describe_onnx(path: Path) -> dict[str, Any]:
    """An ONNX or ORT export: the graph file, its sidecars' config, and every file's size (the
    graph is not parsed: that needs the onnx package, which running an export does not)."""
    from gpts_edge.runtimes.onnx import find_model_file
    from gpts_edge.tokenizer import load_tokenizer

    graph = find_model_file(path)
    folder = graph.parent
    cfg = ModelConfig.load(folder / CONFIG_FILE)
    load_tokenizer(folder / TOKENIZER_FILE, cfg.vocab_size)
    ort = graph.suffix == ".ort"
    flavours = sorted(p.name for p in folder.glob(f"{graph.stem}.*.onnx"))
    what = "ORT-format export (onnxruntime mobile)" if ort else "ONNX export"
    if flavours:
        what += f"; step flavours: {', '.join(flavours)}"
    files = _files(folder) if path.is_dir() else {graph.name: graph.stat().st_size}
    if path.is_file():  # a single graph file given: its sidecars are part of what runs it
        files.update(
            {n: s for n, s in _files(folder).items() if n in (CONFIG_FILE, TOKENIZER_FILE, GENERATION_FILE)}
        )
    return {
        "checkpoint": str(graph),
        "format": what,
        "parameters": cfg.num_parameters,
        "vocab_size": cfg.vocab_size,
        "config": cfg.to_hf_dict(),
        "generation_config": load_generation_config(folder / GENERATION_FILE),
        "files": files,
        "weights_sha256": _sha256(graph),
    }


def _describe_gguf(path: Path) -> dict[str, Any]:
    from gpts_edge.gguf_format import read_gguf

    try:
        m = read_gguf(path)
    except ImportError:  # pragma: no cover - gguf is in the export extra
        raise GptsError("reading GGUF needs the 'gguf' package (pip install 'gpts-edge[export]')") from None
    types = sorted(set(m.tensor_types.values()))
    return {
        "checkpoint": str(path),
        "format": f"GGUF file (arch {m.arch}, tensors {', '.join(types)})",
        "parameters": sum(int(w.size) for w in m.weights.values()),
        "vocab_size": m.config.vocab_size,
        "config": m.config.to_hf_dict(),
        "generation_config": m.generation,
        "files": {path.name: path.stat().st_size},
        "weights_sha256": _sha256(path),
    }
