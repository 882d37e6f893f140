"""The opening layer: a path (or nothing, for the bundled model) and a runtime name in, a Runtime
out. The CLI, ``load()``, eval, bench, parity, web and serve all open models here, so a path means
the same thing everywhere:

- ``None``: the bundled checkpoint;
- a checkpoint directory (``model.safetensors``): exported once per checkpoint hash into the user
  cache for the ONNX runtime, or run as-is by the torch runtime;
- an ONNX folder or ``.onnx``/``.ort`` file: the ONNX runtime;
- a ``.gguf`` file: the numpy GGUF runtime.

Without ``--runtime`` the path decides (a ``.gguf`` runs on the GGUF runtime, everything else on
ONNX). This module sits above ``runtimes/`` and ``export/``; neither of those imports it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpts_edge.constants import (
    CONFIG_FILE,
    GENERATION_FILE,
    GGUF_SUFFIX,
    ONNX_MODEL_FILE,
    ORT_MODEL_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
)
from gpts_edge.errors import GptsError
from gpts_edge.fileio import cache_root, check_readable, hash_file
from gpts_edge.generation import Runtime, TextModel

RUNTIMES = ("torch", "onnx", "gguf")
# Bumped whenever the exporter's graph or folder layout changes, so older cached exports are not
# reused (4: the decode flavour reads its weights from model.onnx instead of carrying a copy;
# 5: in-graph rotary tables and the new int4 scheme; 6: int8 in MatMulNBits; 7: int4 distilled
# with learned clipping on 384-token windows).
CACHE_FORMAT = 7


def model_kind(model: str | Path | None) -> str:
    """'checkpoint', 'onnx' or 'gguf' for a model path (None: the bundled checkpoint)."""
    if model is None:
        return "checkpoint"
    p = Path(model)
    if not p.exists():
        raise GptsError(f"{p}: no such file or folder")
    if p.is_file():
        if p.suffix == GGUF_SUFFIX:
            return "gguf"
        if p.suffix in (".onnx", ".ort"):
            return "onnx"
        raise GptsError(
            f"{p}: expected a checkpoint folder, an ONNX folder, a .onnx/.ort file or a .gguf file"
        )
    check_readable(p)  # an unlistable folder is "cannot read", not "holds no model"
    if (p / WEIGHTS_FILE).is_file():
        return "checkpoint"
    if (p / ONNX_MODEL_FILE).is_file() or (p / ORT_MODEL_FILE).is_file() or any(p.glob("*.onnx")):
        return "onnx"
    raise GptsError(
        f"{p}: expected a checkpoint folder ({WEIGHTS_FILE}) or an exported ONNX folder "
        f"({ONNX_MODEL_FILE}), found neither"
    )


def open_runtime(name: str | None, model: str | Path | None = None, **kwargs: Any) -> Runtime:
    """The Runtime for ``model`` on runtime ``name`` (None: chosen from the path)."""
    kind = model_kind(model)
    name = name or ("gguf" if kind == "gguf" else "onnx")
    if name not in RUNTIMES:
        raise GptsError(f"--runtime: unknown runtime {name!r}; choose from {', '.join(RUNTIMES)}")
    if name == "torch":
        if kind != "checkpoint":
            raise GptsError(f"--runtime torch: needs a checkpoint folder; {model} is a {kind} export")
        try:
            from gpts_edge.torch_runtime import TorchRuntime
        except ImportError:
            raise GptsError(
                "--runtime torch needs PyTorch, which this install lacks: pip install 'gpts-edge[train]' "
                "(or use --runtime onnx, which needs no torch)"
            ) from None
        return TorchRuntime(model, **kwargs)
    if name == "gguf":
        if kind != "gguf":
            raise GptsError(
                f"--runtime gguf: needs a .gguf file (make one with `gpts-edge export --format gguf`), "
                f"found a {kind} {'(the bundled model)' if model is None else model}"
            )
        from gpts_edge.runtimes.gguf import GGUFRuntime

        return GGUFRuntime(model, **kwargs)  # type: ignore[arg-type]
    if kind == "gguf":
        raise GptsError(f"--runtime onnx: {model} is a GGUF file; use --runtime gguf")
    from gpts_edge.runtimes.onnx import OnnxRuntime

    path = cached_export(model) if kind == "checkpoint" else Path(model)  # type: ignore[arg-type]
    return OnnxRuntime(path, **kwargs)


def load(path: str | Path | None = None, threads: int | None = None, runtime: str | None = None) -> TextModel:
    """Text in, text out: ``load("out/").generate("Once upon a time")``. None: the bundled model
    (exported once into the user cache)."""
    return TextModel(open_runtime(runtime, path, threads=threads))


# --- the one ONNX export cache ----------------------------------------------------------------------


def checkpoint_hash(ckpt_dir: Path) -> str:
    """Identity of a checkpoint: its weights and the sidecars that travel into an export."""
    h = hash_file(ckpt_dir / WEIGHTS_FILE)
    for name in (CONFIG_FILE, TOKENIZER_FILE, GENERATION_FILE):
        p = ckpt_dir / name
        # A missing sidecar hashes as empty (the export writes defaults for it).
        if p.is_file():
            hash_file(p, h)
    return h.hexdigest()[:16]


def cached_export(model: str | Path | None = None, *, quantize: str = "none") -> Path:
    """The ONNX export (with its decode flavour) of a checkpoint directory (None: the bundled
    one), made once per checkpoint hash, quantization and graph version in the user's cache."""
    from gpts_edge.checkpoint import resolve_model_dir

    ckpt_dir = resolve_model_dir(model)
    if not (ckpt_dir / WEIGHTS_FILE).is_file():
        raise GptsError(f"{ckpt_dir}: expected a checkpoint ({WEIGHTS_FILE}) or an exported ONNX folder")
    folder = cache_root() / f"onnx-{quantize}-v{CACHE_FORMAT}-{checkpoint_hash(ckpt_dir)}"
    if (folder / ONNX_MODEL_FILE).is_file():
        return folder / ONNX_MODEL_FILE
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise GptsError(
            f"no ONNX export of {ckpt_dir} yet and the onnx package is missing to make one: "
            "pip install 'gpts-edge[export]', or pass --model with an exported ONNX folder"
        ) from None
    from gpts_edge.export.onnx import export_to_folder

    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GptsError(f"{folder.parent}: cannot create the cache directory ({exc.strerror})") from None
    return export_to_folder(ckpt_dir, folder, quantize=quantize, log=lambda _m: None)


def resolve_onnx(model: str | Path | None, log: Callable[[str], None] | None = None) -> Path:
    """The ONNX graph file for ``model`` (a cached export for a checkpoint or None, said to
    ``log`` when given)."""
    from gpts_edge.runtimes.onnx import find_model_file

    kind = model_kind(model)
    if kind == "gguf":
        raise GptsError(f"{model}: a GGUF file; expected an ONNX folder, a .onnx file or a checkpoint")
    if kind == "checkpoint":
        if log is not None:
            log(f"using the cached ONNX export of {'the bundled model' if model is None else model}")
        return cached_export(model)
    return find_model_file(Path(model))  # type: ignore[arg-type]
