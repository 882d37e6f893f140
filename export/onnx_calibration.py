"""Calibration for GPTQ: the inputs of every linear layer on calibration text, collected by running
the float32 graph in onnxruntime with those inputs as outputs.

The default text, gpts_edge/data/calibration_text.txt (116 KB, 36k tokens of the bundled
tokenizer), ships with the package: 121 excerpts of about 1,000 characters drawn with a fixed
seed from public-domain sources of the project's corpus (ELTeC-eng novels, Project Gutenberg books
via GITenberg, the CIA World Factbook, CC0). It is not the parity text. Text the float model
samples itself, the earlier calibration, measured worse (docs/onnx.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

import gpts_edge
from gpts_edge.config import ModelConfig
from gpts_edge.export.onnx_graph import build_model, require_onnx
from gpts_edge.names import (
    ONNX_ATTENTION_MASK,
    ONNX_INPUT_IDS,
    ONNX_POSITION_IDS,
    onnx_past_names,
)

CALIBRATION_TEXT = Path(gpts_edge.__file__).resolve().parent / "data" / "calibration_text.txt"


def calibration_hessians(
    cfg: ModelConfig,
    weights: dict[str, np.ndarray],
    *,
    tokenizer: Any = None,
    ids: np.ndarray | None = None,
    length: int = 256,
    batch: int = 16,
) -> dict[str, np.ndarray]:
    """X^T X of every linear layer's inputs on calibration tokens: ``ids`` (windows, length) when
    given, else the shipped calibration text cut by ``tokenizer`` into windows of ``length``
    (text the float model sampled itself was measured worse, docs/onnx.md). GPTQ never sees the
    parity text. Runs the float32 graph in onnxruntime with the linear inputs as extra outputs."""
    if ids is None and tokenizer is None:
        raise ValueError("calibration_hessians: pass the tokenizer (or calibration ids)")
    import onnxruntime as ort

    onnx = require_onnx()
    names: dict[str, str] = {}
    model = build_model(cfg, weights, linear_inputs=names)
    for tensor in dict.fromkeys(names.values()):
        model.graph.output.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    past_names = onnx_past_names(cfg)
    n_present = 2 * cfg.num_layers
    if ids is None:
        ids = text_ids(tokenizer, min(length, cfg.context_length))
    ids = np.asarray(ids, dtype=np.int64)[:, : cfg.context_length]
    extra = [o.name for o in sess.get_outputs()][1 + n_present :]
    hessians: dict[str, np.ndarray] = {}
    for s in range(0, len(ids), batch):  # batches bound the memory of the recorded inputs
        chunk = ids[s : s + batch]
        empty = np.zeros((chunk.shape[0], cfg.num_kv_heads, 0, cfg.head_dim), dtype=np.float32)
        feeds = {
            ONNX_INPUT_IDS: chunk,
            ONNX_ATTENTION_MASK: np.ones_like(chunk),
            ONNX_POSITION_IDS: np.broadcast_to(np.arange(chunk.shape[1]), chunk.shape).copy(),
            **dict.fromkeys(past_names, empty),
        }
        values = dict(zip(extra, sess.run(extra, feeds), strict=True))
        for linear, tensor in names.items():
            x = values[tensor].reshape(-1, values[tensor].shape[-1]).astype(np.float64)
            hessians[linear] = hessians.get(linear, 0.0) + x.T @ x
    return hessians


def text_ids(tokenizer: Any, length: int, path: Path = CALIBRATION_TEXT) -> np.ndarray:
    """The calibration text as consecutive token windows (n, length); the tail is dropped."""
    flat = tokenizer.encode(path.read_text(encoding="utf-8")).ids
    n = len(flat) // length
    return np.array(flat[: n * length], dtype=np.int64).reshape(n, length)
