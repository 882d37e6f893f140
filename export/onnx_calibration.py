"""Calibration for GPTQ: the inputs of every linear layer on text the float model samples
itself, collected by running the float32 graph in onnxruntime with those inputs as outputs."""

from __future__ import annotations

import numpy as np

from gpts_edge.config import ModelConfig
from gpts_edge.export.onnx_graph import build_model, require_onnx
from gpts_edge.names import (
    ONNX_ATTENTION_MASK,
    ONNX_INPUT_IDS,
    ONNX_POSITION_IDS,
    onnx_past_names,
)


def calibration_hessians(
    cfg: ModelConfig, weights: dict[str, np.ndarray], *, sequences: int = 8, length: int = 256, seed: int = 0
) -> dict[str, np.ndarray]:
    """X^T X of every linear layer's inputs on text the float model writes itself (sampled,
    seeded), so int4 GPTQ needs no data set and never sees the parity text. Runs the float32
    graph in onnxruntime with the linear inputs as extra outputs."""
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
    rng = np.random.default_rng(seed)
    length = min(length, cfg.context_length)
    empty = np.zeros((sequences, cfg.num_kv_heads, 0, cfg.head_dim), dtype=np.float32)
    past_names = onnx_past_names(cfg)
    n_present = 2 * cfg.num_layers
    ids = np.full((sequences, 1), cfg.bos_token_id, dtype=np.int64)
    past = [empty] * len(past_names)
    tokens = ids
    for t in range(length - 1):
        feeds = {
            ONNX_INPUT_IDS: tokens,
            ONNX_ATTENTION_MASK: np.ones((sequences, t + 1), dtype=np.int64),
            ONNX_POSITION_IDS: np.full((sequences, 1), t, dtype=np.int64),
            **dict(zip(past_names, past, strict=True)),
        }
        out = sess.run(None, feeds)
        past = out[1 : 1 + n_present]
        logits = out[0][:, -1].astype(np.float64)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        cum = np.cumsum(p, -1)
        u = rng.random((sequences, 1))
        tokens = np.minimum((cum < u * cum[:, -1:]).sum(-1), cfg.vocab_size - 1)[:, None].astype(np.int64)
        ids = np.concatenate([ids, tokens], axis=1)
    feeds = {
        ONNX_INPUT_IDS: ids,
        ONNX_ATTENTION_MASK: np.ones_like(ids),
        ONNX_POSITION_IDS: np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy(),
        **dict.fromkeys(past_names, empty),
    }
    extra = [o.name for o in sess.get_outputs()][1 + n_present :]
    values = dict(zip(extra, sess.run(extra, feeds), strict=True))
    hessians = {}
    for linear, tensor in names.items():
        x = values[tensor].reshape(-1, values[tensor].shape[-1]).astype(np.float64)
        hessians[linear] = x.T @ x
    return hessians
