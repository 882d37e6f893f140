"""ONNX folders for other runtimes: the transformers.js layout (``--layout transformersjs``).

transformers.js picks the model class and the KV-cache shape from ``config.json``'s
``model_type`` and will not know ours (``gpts``), while our runtime and onnxruntime-genai read
the same file name expecting ``gpts``. Both are served by nesting instead of bending one config:

    DIR/
      config.json              transformers.js' view: model_type "llama" (see below)
      generation_config.json   transformers' GenerationConfig field names
      tokenizer.json, tokenizer_config.json
      onnx/                    an ordinary `gpts-edge export --format onnx` folder, unchanged:
        model.onnx               fp32            (transformers.js dtype "fp32")
        model_quantized.onnx     int8 blockwise  (dtype "q8", the default on wasm)
        model_q4.onnx            int4 blockwise  (dtype "q4")
        config.json (gpts), tokenizer.json, tokenizer_config.json, generation_config.json,
        genai_config.json        -> our runtime and onnxruntime-genai open DIR/onnx

"llama" is honest about the contract transformers.js relies on, which is only the graph's I/O:
optimum's decoder names (input_ids, attention_mask, position_ids, past_key_values.N.key/value ->
logits, present.N.key/value) and a [batch, num_key_value_heads, seq, head_dim] cache. Its llama
class adds no computation of its own; the exclusive attention lives inside the graph. The
top-level config keeps ``exclusive_attention`` and a ``gpts_edge`` note so nobody mistakes the
folder for a llama checkpoint (it holds no weights that transformers could load).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gpts_edge.checkpoint import (
    CONFIG_FILE,
    GENERATION_FILE,
    TOKENIZER_FILE,
    load_checkpoint,
)
from gpts_edge.config import ModelConfig
from gpts_edge.errors import GptsError
from gpts_edge.fileio import atomic_dir, require_output_dir

LAYOUTS = ("onnx", "transformersjs")
ONNX_SUBFOLDER = "onnx"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# Our quantization -> (transformers.js dtype, file name it loads for that dtype).
TRANSFORMERSJS_FILES: dict[str, tuple[str, str]] = {
    "none": ("fp32", "model.onnx"),
    "int8": ("q8", "model_quantized.onnx"),
    "int4": ("q4", "model_q4.onnx"),
}
TRANSFORMERSJS_MODEL_TYPE = "llama"
TRANSFORMERSJS_ARCHITECTURE = "LlamaForCausalLM"


def parse_quantizations(value: str | Sequence[str]) -> list[str]:
    """'none,int4' or ['none', 'int4'] (or 'all') -> a de-duplicated list in a fixed order."""
    items = [p.strip() for p in value.split(",")] if isinstance(value, str) else [str(v) for v in value]
    if items == ["all"]:
        items = list(TRANSFORMERSJS_FILES)
    unknown = [q for q in items if q not in TRANSFORMERSJS_FILES]
    if unknown or not items:
        raise GptsError(
            f"--quantize: expected a comma-separated list of {', '.join(TRANSFORMERSJS_FILES)} (or all), "
            f"found {value!r}"
        )
    return [q for q in TRANSFORMERSJS_FILES if q in items]


def transformersjs_config(cfg: ModelConfig, quantizations: Sequence[str]) -> dict[str, Any]:
    """The top-level config.json transformers.js reads (see the module docstring for why llama)."""
    data = cfg.to_hf_dict()
    data["model_type"] = TRANSFORMERSJS_MODEL_TYPE
    data["architectures"] = [TRANSFORMERSJS_ARCHITECTURE]
    data["pad_token_id"] = cfg.eos_token_id
    data["use_cache"] = True
    # Without a default, transformers.js asks for q8 on wasm and fp32 elsewhere; point it at a
    # file that exists, preferring full precision.
    data["transformers.js_config"] = {"dtype": TRANSFORMERSJS_FILES[quantizations[0]][0]}
    data["gpts_edge"] = {
        "model_type": cfg.to_hf_dict()["model_type"],
        "note": "GPT-S with exclusive attention inside the ONNX graph; llama names only its I/O. "
        f"The gpts-edge view of this model is {ONNX_SUBFOLDER}/{CONFIG_FILE}.",
    }
    return data


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def export_transformersjs(
    model: str | Path | None,
    output: str | Path,
    *,
    quantize: str | Sequence[str] = "none",
    opset: int | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Write the transformers.js layout at folder ``output`` (replaced as a whole); returns it."""
    from gpts_edge.export.hf import hf_generation_config, hf_tokenizer_config
    from gpts_edge.export.onnx import export_onnx

    quantizations = parse_quantizations(quantize)
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise GptsError(f"{out}: exists and is not a directory (expected an output folder for this layout)")
    if out.is_dir() and any(out.iterdir()) and not (out / CONFIG_FILE).is_file():
        # The folder is swapped out as a whole: never throw away something that is not an export.
        raise GptsError(f"{out}: folder is not empty and holds no {CONFIG_FILE}; refusing to replace it")
    require_output_dir(out.parent)
    ckpt = load_checkpoint(model)
    cfg = ckpt.config
    try:
        with atomic_dir(out) as tmp:
            sub = tmp / ONNX_SUBFOLDER
            sub.mkdir()
            # The primary (first) variant goes last so the shared genai_config.json names it.
            for q in reversed(quantizations):
                log(f"== {TRANSFORMERSJS_FILES[q][1]} ({q})")
                export_onnx(ckpt.path, sub / TRANSFORMERSJS_FILES[q][1], quantize=q, opset=opset, log=log)
            tok_cfg = hf_tokenizer_config(cfg)
            if not (sub / TOKENIZER_CONFIG_FILE).is_file():
                _write_json(sub / TOKENIZER_CONFIG_FILE, tok_cfg)
            _write_json(tmp / CONFIG_FILE, transformersjs_config(cfg, quantizations))
            _write_json(tmp / GENERATION_FILE, hf_generation_config(ckpt.generation, cfg))
            _write_json(tmp / TOKENIZER_CONFIG_FILE, tok_cfg)
            shutil.copyfile(ckpt.tokenizer_path, tmp / TOKENIZER_FILE)
            for f in [*tmp.iterdir(), *sub.iterdir()]:
                if f.is_file():
                    os.chmod(f, 0o644)
    except OSError as exc:
        raise GptsError(f"{out}: cannot write the export ({exc.strerror or exc})") from None
    log(f"wrote {out} ({', '.join(TRANSFORMERSJS_FILES[q][1] for q in quantizations)})")
    return out
