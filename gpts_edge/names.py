"""The one name table. Every exporter and reader walks it; reverse maps are computed here.

Checkpoint names are HF llama names. ``{i}`` is the layer index. The ONNX I/O contract of both
graph flavours lives here too, so the exporter that writes a graph and the runtime that binds
its inputs read the same names.
"""

from __future__ import annotations

from gpts_edge.config import ModelConfig
from gpts_edge.errors import GptsError

# checkpoint name -> GGUF name (llama.cpp's tensor names)
TENSOR_NAMES: dict[str, str] = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
    "model.norm.weight": "output_norm.weight",
}

# ONNX graph I/O (the names optimum, onnxruntime-genai and transformers.js use).
ONNX_INPUT_IDS = "input_ids"
ONNX_ATTENTION_MASK = "attention_mask"
ONNX_POSITION_IDS = "position_ids"
ONNX_PAST_KEY = "past_key_values.{i}.key"
ONNX_PAST_VALUE = "past_key_values.{i}.value"
ONNX_PRESENT_KEY = "present.{i}.key"
ONNX_PRESENT_VALUE = "present.{i}.value"
ONNX_LOGITS = "logits"
# The decode flavour (model.decode.onnx, the runtime's fast step graph: batch 1, one fixed-size KV
# buffer per layer that GroupQueryAttention updates in place, last-position logits) replaces
# attention_mask/position_ids by GroupQueryAttention's two length inputs.
ONNX_DECODE_SEQLENS_K = "seqlens_k"  # int32 [1]: total length - 1 (GroupQueryAttention's convention)
ONNX_DECODE_TOTAL_LENGTH = "total_sequence_length"  # int32 scalar: cached + new tokens
ONNX_FLAVOURS = ("compatible", "decode")
# A flavour that stores no weights of its own reads them from the full graph's file (ONNX external
# data pointing into model.onnx); these metadata keys name that file and its sha256, so a reader
# can tell a flavour left over from another export (whose offsets would read the wrong bytes).
ONNX_META_WEIGHTS_FILE = "gpts.weights_file"
ONNX_META_WEIGHTS_SHA256 = "gpts.weights_sha256"


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every checkpoint tensor name with its shape ((out, in) for linear weights)."""
    d, hd, f = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    per_layer = {
        "model.layers.{i}.input_layernorm.weight": (d,),
        "model.layers.{i}.self_attn.q_proj.weight": (cfg.num_heads * hd, d),
        "model.layers.{i}.self_attn.k_proj.weight": (cfg.num_kv_heads * hd, d),
        "model.layers.{i}.self_attn.v_proj.weight": (cfg.num_kv_heads * hd, d),
        "model.layers.{i}.self_attn.o_proj.weight": (d, cfg.num_heads * hd),
        "model.layers.{i}.post_attention_layernorm.weight": (d,),
        "model.layers.{i}.mlp.gate_proj.weight": (f, d),
        "model.layers.{i}.mlp.up_proj.weight": (f, d),
        "model.layers.{i}.mlp.down_proj.weight": (d, f),
    }
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, d)}
    for i in range(cfg.num_layers):
        for pattern, shape in per_layer.items():
            shapes[pattern.format(i=i)] = shape
    shapes["model.norm.weight"] = (d,)
    return shapes


def _split(name: str) -> tuple[str, int | None]:
    """'model.layers.3.mlp.up_proj.weight' -> ('model.layers.{i}.mlp.up_proj.weight', 3)."""
    parts = name.split(".")
    for k, part in enumerate(parts):
        if part.isdigit() and k > 0 and parts[k - 1] in ("layers", "blk"):
            return ".".join([*parts[:k], "{i}", *parts[k + 1 :]]), int(part)
    return name, None


def _translate(name: str, table: dict[str, str], what: str) -> str:
    pattern, layer = _split(name)
    if pattern not in table:
        raise GptsError(f"tensor {name!r} has no {what} name in the name table (gpts_edge/names.py)")
    target = table[pattern]
    return target.format(i=layer) if layer is not None else target


def gguf_name(checkpoint_name: str) -> str:
    return _translate(checkpoint_name, TENSOR_NAMES, "GGUF")


_GGUF_TO_CHECKPOINT = {v: k for k, v in TENSOR_NAMES.items()}


def checkpoint_name_from_gguf(name: str) -> str:
    return _translate(name, _GGUF_TO_CHECKPOINT, "checkpoint")


def onnx_past_names(cfg: ModelConfig) -> list[str]:
    """``past_key_values.{i}.key/value`` in graph input order (layer by layer, key first)."""
    return [
        n for i in range(cfg.num_layers) for n in (ONNX_PAST_KEY.format(i=i), ONNX_PAST_VALUE.format(i=i))
    ]


def onnx_present_names(cfg: ModelConfig) -> list[str]:
    """``present.{i}.key/value``, in the same order as ``onnx_past_names``."""
    return [
        n
        for i in range(cfg.num_layers)
        for n in (ONNX_PRESENT_KEY.format(i=i), ONNX_PRESENT_VALUE.format(i=i))
    ]


def onnx_io_names(cfg: ModelConfig, flavour: str = "compatible") -> tuple[list[str], list[str]]:
    """Graph inputs and outputs of ``flavour`` in order; the KV names are the same in both."""
    if flavour not in ONNX_FLAVOURS:
        raise GptsError(f"flavour: expected one of {', '.join(ONNX_FLAVOURS)}, found {flavour!r}")
    if flavour == "decode":
        head = [ONNX_INPUT_IDS, ONNX_DECODE_SEQLENS_K, ONNX_DECODE_TOTAL_LENGTH]
    else:
        head = [ONNX_INPUT_IDS, ONNX_ATTENTION_MASK, ONNX_POSITION_IDS]
    return head + onnx_past_names(cfg), [ONNX_LOGITS, *onnx_present_names(cfg)]
