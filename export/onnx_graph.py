"""ONNX export with KV cache: one hand-assembled graph for prefill and decode, from numpy weights.

The graph is built node by node with ``onnx.helper`` (no torch, no tracing), so it is small, its
bytes depend only on the checkpoint, and every op is one that stock onnxruntime CPU runs:

    input_ids ─ Gather(embed) ─┬─ L x [ RMSNorm ─ MatMul(qkv) ─ Split ─ RotaryEmbedding(q,k)
                               │        ─ Attention(GQA, past, bool mask) ─ XSA ─ MatMul(o)
                               │        ─ SkipSimplifiedLayerNorm ─ SwiGLU ] ─ lm_head ─ logits
    attention_mask, position ─ bool mask (causal & not padding | self), computed once per call

Standard opset-23 ops (RMSNormalization, RotaryEmbedding, Attention) carry most of the work;
``com.microsoft`` ops are used where they cut nodes or bytes (SkipSimplifiedLayerNormalization,
MatMulNBits, GatherBlockQuantized). XSA uses the value vectors computed in this call (the ``v``
fed to Attention), never the cache, so prefill and decode are both exact.

Quantized graphs store the tied embedding once as blockwise int8/int4 bytes that serve both the
lm_head (MatMulNBits) and the token lookup (GatherBlockQuantized).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gpts_edge.config import ModelConfig
from gpts_edge.constants import XSA_EPS
from gpts_edge.errors import GptsError
from gpts_edge.export.onnx_quant import (
    BLOCK_SIZE,
    Int4Scheme,
    QWeight,
    default_scheme,
    gptq_blockwise,
    int8_blocks,
)
from gpts_edge.names import (
    ONNX_ATTENTION_MASK,
    ONNX_DECODE_SEQLENS_K,
    ONNX_DECODE_TOTAL_LENGTH,
    ONNX_FLAVOURS,
    ONNX_INPUT_IDS,
    ONNX_LOGITS,
    ONNX_PAST_KEY,
    ONNX_PAST_VALUE,
    ONNX_POSITION_IDS,
    ONNX_PRESENT_KEY,
    ONNX_PRESENT_VALUE,
)

DEFAULT_OPSET = 23
# RMSNormalization, RotaryEmbedding and Attention entered the default domain in opset 23.
MIN_OPSET = 23
# Graph flavours: "compatible" is the export with the standard I/O names and growing KV tensors;
# "decode" is the runtime's fast step graph (model.decode.onnx), see build_model.
FLAVOURS = ONNX_FLAVOURS
DECODE_LAYOUT = "batch 1, shared fixed-size KV buffer updated in place, last-position logits"


def decode_supported(cfg: ModelConfig) -> bool:
    """Whether the decode flavour can run: onnxruntime's CPU GroupQueryAttention kernel refuses
    head sizes that are not a multiple of 16 (GPT-S-1.4M has 32)."""
    return cfg.head_dim % 16 == 0


def require_onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise GptsError(
            "ONNX export needs the onnx package: pip install 'gpts-edge[export]' "
            "(or pass --model with an already exported folder)"
        ) from None
    return onnx


def max_supported_opset() -> int:
    """The newest default-domain opset both onnx and the installed onnxruntime know."""
    import onnxruntime

    onnx = require_onnx()
    # onnxruntime does not publish its opset ceiling; these are the versions it added them in.
    ort_version = tuple(int(p) for p in onnxruntime.__version__.split(".")[:2] if p.isdigit())
    ort_max = 23 if ort_version < (1, 24) else 25
    return min(onnx.defs.onnx_opset_version(), ort_max)


# --- graph ----------------------------------------------------------------------------------------


class _Graph:
    """A tiny builder that names values uniquely and keeps nodes in insertion order."""

    def __init__(self, onnx: Any) -> None:
        self.onnx = onnx
        self.h = onnx.helper
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self._count: dict[str, int] = {}

    def name(self, base: str) -> str:
        n = self._count.get(base, 0)
        self._count[base] = n + 1
        return base if n == 0 else f"{base}_{n}"

    def init(self, name: str, array: np.ndarray) -> str:
        self.inits.append(self.onnx.numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(
        self,
        op_type: str,
        inputs: list[str],
        n_out: int = 1,
        *,
        name: str | None = None,
        domain: str = "",
        outputs: list[str] | None = None,
        **attrs: Any,
    ) -> Any:
        base = name or op_type
        node_name = self.name(base)
        outs = outputs or [f"{node_name}/out{i}" if n_out > 1 else f"{node_name}/out" for i in range(n_out)]
        self.nodes.append(
            self.h.make_node(op_type, inputs, outs, name=node_name, domain=domain or None, **attrs)
        )
        return outs[0] if n_out == 1 else outs


def _rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """The rotary inverse frequencies (head_dim/2,) as gpts_edge.model.rope_cos_sin computes them
    (float32); the graph multiplies them by the positions and takes cos/sin."""
    hd = cfg.head_dim
    return np.power(
        np.float32(cfg.rope_theta), -np.arange(0, hd, 2, dtype=np.float32) / np.float32(hd)
    ).astype(np.float32)


def build_model(
    cfg: ModelConfig,
    weights: dict[str, np.ndarray],
    *,
    quantize: str = "none",
    opset: int = DEFAULT_OPSET,
    last_logits_only: bool = False,
    hessians: dict[str, np.ndarray] | None = None,
    linear_inputs: dict[str, str] | None = None,
    flavour: str = "compatible",
    scheme: Int4Scheme | None = None,
) -> Any:
    """The ONNX ModelProto for ``weights`` (checkpoint names, float32).

    ``last_logits_only`` builds the runtime's decode flavour: same inputs and names, but ``logits``
    is [batch, 1, vocab] (the last position), which skips the head for every prompt token but one.
    ``hessians`` (linear node name -> X^T X of its inputs) switches int4 layer weights from
    round-to-nearest to GPTQ; ``linear_inputs``, when given, is filled with linear node name -> the
    name of its input tensor (how ``calibration_hessians`` finds what to record). ``scheme``: how
    int8/int4 store each weight (default ``onnx_quant.default_scheme(quantize)``).

    ``flavour="decode"`` builds the graph the project's own runtime steps with (see DECODE_DOC):
    batch 1, no padding, a fixed-size KV buffer per layer that onnxruntime's GroupQueryAttention
    updates in place, rotary inside the attention node, and the last position's logits only.
    """
    if flavour not in FLAVOURS:
        raise GptsError(f"flavour: expected one of {', '.join(FLAVOURS)}, found {flavour!r}")
    decode = flavour == "decode"
    if decode and not decode_supported(cfg):
        raise GptsError(
            f"decode flavour: onnxruntime's GroupQueryAttention needs head_dim a multiple of 16, "
            f"found {cfg.head_dim}"
        )
    last_logits_only = last_logits_only or decode
    onnx = require_onnx()
    from onnx import TensorProto

    h = onnx.helper
    g = _Graph(onnx)
    d, hd, nh, nkv, f = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size
    grp, V, eps = cfg.group_size, cfg.vocab_size, float(cfg.rms_norm_eps)
    quant = quantize != "none"
    block = BLOCK_SIZE["int8"]  # DequantizeLinear blocks; MatMulNBits blocks come from the scheme
    scheme = scheme or default_scheme(quantize)
    # The tied table folded (int8 behind DequantizeLinear, float32 at load: LEGACY_INT8) or in
    # MatMulNBits/GatherBlockQuantized.
    folded_table = quant and scheme.folded_for("embed")

    def nbits_weight(weight: np.ndarray, name: str) -> QWeight:
        """An int4-scheme weight: GPTQ where a Hessian was recorded (the layers), else nearest
        (the tied table, whose embedding side GPTQ's Hessian does not see)."""
        return scheme.quantize(weight, name, None if hessians is None else hessians.get(name))

    def nbits_inputs(qw: QWeight, name: str, packed: str, scales: str) -> list[str]:
        """packed, scales[, zero points] input names of MatMulNBits/GatherBlockQuantized."""
        zp = qw.packed_zero_points()
        return [packed, scales] + ([] if zp is None else [g.init(f"{name}.zero_points", zp)])

    def w(name: str) -> np.ndarray:
        return np.asarray(weights[name], dtype=np.float32)

    def int8_weight(weight: np.ndarray, name: str) -> str:
        """Blockwise int8 bytes + DequantizeLinear: onnxruntime folds the float weight at load when
        the session sets session.disable_quant_qdq=1 (our runtime does), so compute stays float32
        (as accurate and as fast as the float graph) while the file holds one byte per weight."""
        if hessians is not None and name in hessians:
            packed, scales = gptq_blockwise(weight, hessians[name], 8, block)
            q = (packed.reshape(weight.shape[0], -1)[:, : weight.shape[1]].astype(np.int16) - 128).astype(
                np.int8
            )
        else:
            q, scales = int8_blocks(weight, block)
        return g.op(
            "DequantizeLinear",
            [g.init(f"{name}.qweight", q), g.init(f"{name}.scales", scales)],
            name=f"{name}/dequantize",
            axis=1,
            block_size=block,
        )

    def linear(x: str, weight: np.ndarray, name: str) -> str:
        """x @ weight.T for a (out, in) weight: MatMul on float32, MatMulNBits when quantized."""
        n_out, k = weight.shape
        if linear_inputs is not None:
            linear_inputs[name] = x
        if not quant:
            return g.op("MatMul", [x, g.init(f"{name}.weight", weight.T)], name=name)
        if scheme.folded_for(name):
            wt = g.op("Transpose", [int8_weight(weight, name)], name=f"{name}/weight_t", perm=[1, 0])
            return g.op("MatMul", [x, wt], name=name)
        qw = nbits_weight(weight, name)
        inputs = nbits_inputs(
            qw, name, g.init(f"{name}.qweight", qw.packed), g.init(f"{name}.scales", qw.scales.reshape(-1))
        )
        return g.op(
            "MatMulNBits",
            [x, *inputs],
            name=name,
            domain="com.microsoft",
            K=k,
            N=n_out,
            bits=qw.bits,
            block_size=qw.block,
            # 4: int8 activations inside the kernel (docs/onnx.md has what it costs and buys).
            accuracy_level=scheme.level_for(name),
        )

    # Constants shared by all layers. The rotary tables (context x head_dim/2, 49 KB for GPT-S)
    # are computed from 16 frequencies by constant nodes that onnxruntime folds at load, so the
    # file does not carry them.
    inv_freq = _rope_inv_freq(cfg)
    for name, value in (("rope.start", 0), ("rope.limit", cfg.context_length), ("rope.delta", 1)):
        g.inits.append(onnx.numpy_helper.from_array(np.array(value, np.float32), name))  # 0-d
    positions = g.op("Range", ["rope.start", "rope.limit", "rope.delta"], name="rope/positions")
    pos_col = g.op("Unsqueeze", [positions, g.init("rope.axis1", np.array([1], np.int64))], name="rope/col")
    freqs = g.op("Mul", [pos_col, g.init("rope.inv_freq", inv_freq)], name="rope/freqs")
    g.op("Cos", [freqs], name="rope/cos", outputs=["rope.cos"])
    g.op("Sin", [freqs], name="rope/sin", outputs=["rope.sin"])
    g.init("const.xsa_eps", np.array(XSA_EPS, dtype=np.float32))
    g.init("const.zero", np.array(0, dtype=np.int64))
    g.init("const.one", np.array(1, dtype=np.int64))
    g.init("const.axis1", np.array([1], dtype=np.int64))
    g.init("const.axis_last", np.array([-1], dtype=np.int64))
    g.init("const.axes01", np.array([1, 2], dtype=np.int64))
    g.init("const.shape_y5", np.array([0, 0, nkv, grp, hd], dtype=np.int64))
    g.init("const.shape_vrow", np.array([0, 0, nkv, 1, hd], dtype=np.int64))
    g.init("const.shape_vcol", np.array([0, 0, nkv, hd, 1], dtype=np.int64))
    g.init("const.shape_y3", np.array([0, 0, nh * hd], dtype=np.int64))
    g.init("const.split_qkv", np.array([(nh + nkv) * hd, nkv * hd], dtype=np.int64))
    g.init("const.split_qk", np.array([nh * hd, nkv * hd], dtype=np.int64))
    g.init("const.split_ff", np.array([f, f], dtype=np.int64))
    if decode:
        g.init("const.xsa_gamma", np.full(hd, 1 / np.sqrt(hd), dtype=np.float32))
        g.init("const.v_start", np.array([(nh + nkv) * hd], dtype=np.int64))
        g.init("const.v_end", np.array([(nh + 2 * nkv) * hd], dtype=np.int64))

    if not decode:
        # Attention mask (B, 1, S, past+S): key j visible to query i when j <= i (causal) and j is not
        # padding; a query always sees itself so a padding row never softmaxes over nothing. This is
        # gpts_edge.model's rule, built once per call.
        seq = g.op("Shape", [ONNX_INPUT_IDS], name="mask/seq_len", start=1, end=2)
        total = g.op("Shape", [ONNX_ATTENTION_MASK], name="mask/total_len", start=1, end=2)
        past = g.op("Sub", [total, seq], name="mask/past_len")
        total_s = g.op("Squeeze", [total], name="mask/total_scalar")
        past_s = g.op("Squeeze", [past], name="mask/past_scalar")
        k_pos = g.op("Range", ["const.zero", total_s, "const.one"], name="mask/key_pos")
        q_pos = g.op("Range", [past_s, total_s, "const.one"], name="mask/query_pos")
        q_col = g.op("Unsqueeze", [q_pos, "const.axis1"], name="mask/query_col")
        causal = g.op("LessOrEqual", [k_pos, q_col], name="mask/causal")
        itself = g.op("Equal", [k_pos, q_col], name="mask/self")
        real = g.op("Cast", [ONNX_ATTENTION_MASK], name="mask/not_padding", to=TensorProto.BOOL)
        real4 = g.op("Unsqueeze", [real, "const.axes01"], name="mask/not_padding_4d")
        visible = g.op("And", [causal, real4], name="mask/visible")
        mask = g.op("Or", [visible, itself], name="mask/bool")

    # Token embedding (tied with the head).
    emb = w("model.embed_tokens.weight")
    if folded_table:
        emb_f = int8_weight(emb, "embed")
        x = g.op("Gather", [emb_f, ONNX_INPUT_IDS], name="embed/gather")
    elif quant:
        e_q = nbits_weight(emb, "embed")
        g.init("embed.qweight", e_q.packed)
        g.init("embed.scales", e_q.scales)
        e_inputs = nbits_inputs(e_q, "embed", "embed.qweight", "embed.scales")
        e_rows = g.op(
            "Reshape",
            ["embed.qweight", g.init("const.shape_embed_rows", np.array([V, -1], np.int64))],
            name="embed/rows",
        )
        x = g.op(
            "GatherBlockQuantized",
            [e_rows, ONNX_INPUT_IDS, *e_inputs[1:]],
            name="embed/gather",
            domain="com.microsoft",
            block_size=e_q.block,
            bits=e_q.bits,
            gather_axis=0,
            quantize_axis=1,
        )
    else:
        g.init("embed.weight", emb)
        x = g.op("Gather", ["embed.weight", ONNX_INPUT_IDS], name="embed/gather")

    normed = g.op(
        "RMSNormalization",
        [x, g.init("layers.0.input_norm.weight", w("model.layers.0.input_layernorm.weight"))],
        name="layers.0/input_norm",
        epsilon=eps,
        axis=-1,
    )
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        a = f"layers.{i}/attn"
        wqkv = np.concatenate(
            [
                w(p + "self_attn.q_proj.weight"),
                w(p + "self_attn.k_proj.weight"),
                w(p + "self_attn.v_proj.weight"),
            ],
            axis=0,
        )
        qkv = linear(normed, wqkv, f"{a}/qkv_proj")
        if decode:
            # Packed q|k|v straight from the MatMul; rotary and the in-place KV write happen inside
            # GroupQueryAttention, whose present.* outputs are bound to the past.* buffers.
            y = g.op(
                "GroupQueryAttention",
                [
                    qkv,
                    "",
                    "",
                    ONNX_PAST_KEY.format(i=i),
                    ONNX_PAST_VALUE.format(i=i),
                    ONNX_DECODE_SEQLENS_K,
                    ONNX_DECODE_TOTAL_LENGTH,
                    "rope.cos",
                    "rope.sin",
                ],
                3,
                name=f"{a}/attention",
                domain="com.microsoft",
                num_heads=nh,
                kv_num_heads=nkv,
                do_rotary=1,
                outputs=[f"{a}/y", ONNX_PRESENT_KEY.format(i=i), ONNX_PRESENT_VALUE.format(i=i)],
            )[0]
            v = g.op("Slice", [qkv, "const.v_start", "const.v_end", "const.axis_last"], name=f"{a}/v")
        else:
            qk, v = g.op("Split", [qkv, "const.split_qkv"], 2, name=f"{a}/split_qkv_v", axis=-1)
            # One rotary node for q and k together: they share positions and tables.
            qk = g.op(
                "RotaryEmbedding",
                [qk, "rope.cos", "rope.sin", ONNX_POSITION_IDS],
                name=f"{a}/rotary",
                num_heads=nh + nkv,
            )
            q, k = g.op("Split", [qk, "const.split_qk"], 2, name=f"{a}/split_q_k", axis=-1)
            y = g.op(
                "Attention",
                [q, k, v, mask, ONNX_PAST_KEY.format(i=i), ONNX_PAST_VALUE.format(i=i)],
                3,
                name=f"{a}/attention",
                q_num_heads=nh,
                kv_num_heads=nkv,
                outputs=[f"{a}/y", ONNX_PRESENT_KEY.format(i=i), ONNX_PRESENT_VALUE.format(i=i)],
            )[0]
        if cfg.exclusive_attention and decode:
            # z = y - (y.u) u with u = v / sqrt(v.v + eps): one RMSNormalization (scale 1/sqrt(hd),
            # epsilon eps/hd) makes u, so XSA is 9 nodes instead of 11. It equals the
            # reference's division by max(v.v, eps) up to eps / v.v (1e-12 relative), and both
            # leave y unchanged when v = 0.
            y5 = g.op("Reshape", [y, "const.shape_y5"], name=f"{a}/xsa/y_grouped")
            v_row = g.op("Reshape", [v, "const.shape_vrow"], name=f"{a}/xsa/v_row")
            u = g.op(
                "RMSNormalization",
                [v_row, "const.xsa_gamma"],
                name=f"{a}/xsa/v_unit",
                axis=-1,
                epsilon=XSA_EPS / hd,
                stash_type=1,
            )
            yu = g.op(
                "ReduceSum",
                [g.op("Mul", [y5, u], name=f"{a}/xsa/y_times_u"), "const.axis_last"],
                name=f"{a}/xsa/y_dot_u",
                keepdims=1,
            )
            proj = g.op("Mul", [yu, u], name=f"{a}/xsa/projection")
            z5 = g.op("Sub", [y5, proj], name=f"{a}/xsa/exclusive")
            y = g.op("Reshape", [z5, "const.shape_y3"], name=f"{a}/xsa/heads")
        elif cfg.exclusive_attention:
            # z = y - (y.v / max(v.v, eps)) v per query head, v from this call's tokens.
            y5 = g.op("Reshape", [y, "const.shape_y5"], name=f"{a}/xsa/y_grouped")
            v_row = g.op("Reshape", [v, "const.shape_vrow"], name=f"{a}/xsa/v_row")
            v_col = g.op("Reshape", [v, "const.shape_vcol"], name=f"{a}/xsa/v_col")
            vv = g.op("ReduceSumSquare", [v_row, "const.axis_last"], name=f"{a}/xsa/v_dot_v", keepdims=1)
            vv = g.op("Max", [vv, "const.xsa_eps"], name=f"{a}/xsa/clamp")
            v_hat = g.op("Div", [v_row, vv], name=f"{a}/xsa/v_scaled")
            yv = g.op("MatMul", [y5, v_col], name=f"{a}/xsa/y_dot_v")
            proj = g.op("Mul", [yv, v_hat], name=f"{a}/xsa/projection")
            z5 = g.op("Sub", [y5, proj], name=f"{a}/xsa/exclusive")
            y = g.op("Reshape", [z5, "const.shape_y3"], name=f"{a}/xsa/heads")
        o = linear(y, w(p + "self_attn.o_proj.weight"), f"{a}/o_proj")
        normed, _, _, x = g.op(
            "SkipSimplifiedLayerNormalization",
            [
                x,
                o,
                g.init(f"layers.{i}.post_attention_norm.weight", w(p + "post_attention_layernorm.weight")),
            ],
            4,
            name=f"layers.{i}/residual_post_attention_norm",
            domain="com.microsoft",
            epsilon=eps,
        )
        m = f"layers.{i}/mlp"
        wgu = np.concatenate([w(p + "mlp.gate_proj.weight"), w(p + "mlp.up_proj.weight")], axis=0)
        gu = linear(normed, wgu, f"{m}/gate_up_proj")
        gate, up = g.op("Split", [gu, "const.split_ff"], 2, name=f"{m}/split_gate_up", axis=-1)
        act = g.op("Mul", [gate, g.op("Sigmoid", [gate], name=f"{m}/sigmoid")], name=f"{m}/silu")
        mlp = linear(
            g.op("Mul", [act, up], name=f"{m}/gate_times_up"), w(p + "mlp.down_proj.weight"), f"{m}/down_proj"
        )
        if i + 1 < cfg.num_layers:
            norm_w = g.init(
                f"layers.{i + 1}.input_norm.weight", w(f"model.layers.{i + 1}.input_layernorm.weight")
            )
            norm_name = f"layers.{i}/residual_layers.{i + 1}/input_norm"
        else:
            norm_w = g.init("final_norm.weight", w("model.norm.weight"))
            norm_name = f"layers.{i}/residual_final_norm"
        normed, _, _, x = g.op(
            "SkipSimplifiedLayerNormalization",
            [x, mlp, norm_w],
            4,
            name=norm_name,
            domain="com.microsoft",
            epsilon=eps,
        )

    if last_logits_only:
        last = g.init("const.last", np.array([-1], dtype=np.int64))
        end = g.init("const.end", np.array([np.iinfo(np.int64).max], dtype=np.int64))
        normed = g.op("Slice", [normed, last, end, "const.axis1"], name="lm_head/last_position")
    if folded_table:
        head = g.op("Transpose", [emb_f], name="lm_head/weight_t", perm=[1, 0])
        g.op("MatMul", [normed, head], name="lm_head", outputs=[ONNX_LOGITS])
    elif quant:
        # The same bytes as the embedding, viewed as MatMulNBits' (N, blocks, blob) layout.
        n_blocks = -(-d // e_q.block)
        b3 = g.op(
            "Reshape",
            ["embed.qweight", g.init("const.shape_head", np.array([V, n_blocks, -1], np.int64))],
            name="lm_head/weight_blocks",
        )
        s1 = g.op(
            "Reshape",
            ["embed.scales", g.init("const.shape_flat", np.array([-1], np.int64))],
            name="lm_head/scales_flat",
        )
        g.op(
            "MatMulNBits",
            [normed, b3, s1, *e_inputs[2:]],
            name="lm_head",
            domain="com.microsoft",
            K=d,
            N=V,
            bits=e_q.bits,
            block_size=e_q.block,
            accuracy_level=scheme.level_for("lm_head"),
            outputs=[ONNX_LOGITS],
        )
    else:
        # Transposing the stored embedding keeps one copy in the file; onnxruntime folds it at load.
        head = g.op("Transpose", ["embed.weight"], name="lm_head/weight_t", perm=[1, 0])
        g.op("MatMul", [normed, head], name="lm_head", outputs=[ONNX_LOGITS])

    f32, i64, i32 = TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32
    if decode:
        inputs = [
            h.make_tensor_value_info(ONNX_INPUT_IDS, i64, [1, "sequence_length"]),
            h.make_tensor_value_info(ONNX_DECODE_SEQLENS_K, i32, [1]),
            h.make_tensor_value_info(ONNX_DECODE_TOTAL_LENGTH, i32, []),
        ]
        kv_shape: list[Any] = [1, nkv, "max_sequence_length", hd]
        logits_shape: list[Any] = [1, 1, V]
    else:
        inputs = [
            h.make_tensor_value_info(ONNX_INPUT_IDS, i64, ["batch_size", "sequence_length"]),
            h.make_tensor_value_info(ONNX_ATTENTION_MASK, i64, ["batch_size", "total_sequence_length"]),
            h.make_tensor_value_info(ONNX_POSITION_IDS, i64, ["batch_size", "sequence_length"]),
        ]
        kv_shape = ["batch_size", nkv, "past_sequence_length", hd]
        logits_shape = ["batch_size", 1 if last_logits_only else "sequence_length", V]
    present_shape = kv_shape if decode else ["batch_size", nkv, "total_sequence_length", hd]
    outputs = [h.make_tensor_value_info(ONNX_LOGITS, f32, logits_shape)]
    for i in range(cfg.num_layers):
        for name in (ONNX_PAST_KEY, ONNX_PAST_VALUE):
            inputs.append(h.make_tensor_value_info(name.format(i=i), f32, kv_shape))
        for name in (ONNX_PRESENT_KEY, ONNX_PRESENT_VALUE):
            outputs.append(h.make_tensor_value_info(name.format(i=i), f32, present_shape))
    graph = h.make_graph(g.nodes, "gpts", inputs, outputs, g.inits)
    model = h.make_model(
        graph,
        producer_name="gpts-edge",
        producer_version=_version(),
        opset_imports=[h.make_opsetid("", opset), h.make_opsetid("com.microsoft", 1)],
        ir_version=10,
    )
    model.doc_string = f"GPT-S (XGQA) decoder with KV cache; weights {quantize}"
    layout = DECODE_LAYOUT if decode else "prefill+decode, left padding via attention_mask"
    meta = {"gpts.quantize": quantize, "gpts.layout": layout, "gpts.flavour": flavour}
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    return model


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("gpts-edge")
    except Exception:
        return "0"


def check_model(model: Any) -> Any:
    """onnx.checker (full check) and strict shape inference; returns the inferred model."""
    onnx = require_onnx()
    try:
        onnx.checker.check_model(model, full_check=True)
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise GptsError(f"exported graph failed onnx.checker: {str(exc).splitlines()[0]}") from None
