"""Blockwise weight quantization in numpy (int8 and int4, the MatMulNBits/GatherBlockQuantized
layout), GPTQ, and the int4 scheme: which weight gets how many bits. The numbers the ONNX graph
builder stores for a quantized export."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

# Block size for blockwise weight quantization. Measured on the bundled checkpoint (mean KL on
# real text): int8 64 -> 1.1e-3, 32 -> 8.3e-4. int4: see Int4Scheme and docs/onnx.md.
BLOCK_SIZE = {"int8": 32, "int4": 32}
BITS = {"int8": 8, "int4": 4}


@dataclass(frozen=True)
class QWeight:
    """One quantized (N, K) weight in MatMulNBits layout: ``packed`` uint8 (N, n_blocks,
    block * bits / 8), ``scales`` float32 (N, n_blocks), ``zero_points`` uint8 (N, n_blocks)
    unpacked (None: symmetric, the op's default zero point 2**(bits-1))."""

    packed: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    bits: int
    block: int

    def packed_zero_points(self) -> np.ndarray | None:
        """Zero points as MatMulNBits/GatherBlockQuantized read them: 4-bit pairs in one byte
        (low nibble first) along the blocks, 8-bit one per byte."""
        z = self.zero_points
        if z is None or self.bits == 8:
            return z
        if z.shape[1] % 2:
            z = np.concatenate([z, np.zeros((z.shape[0], 1), np.uint8)], axis=1)
        return (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8)

    def dequantize(self, k: int) -> np.ndarray:
        q = self.packed
        if self.bits == 4:
            q = np.stack([q & 15, q >> 4], -1).reshape(*q.shape[:-1], -1)
        z = 2 ** (self.bits - 1) if self.zero_points is None else self.zero_points[..., None]
        w = (q.astype(np.float32) - z) * self.scales[..., None]
        return w.reshape(w.shape[0], -1)[:, :k]


@dataclass(frozen=True)
class Int4Scheme:
    """How ``--quantize int4`` stores each weight (docs/onnx.md has what each choice buys).

    Weights are grouped as the graph fuses them: ``embed`` (the tied embedding and lm_head, one
    table read by GatherBlockQuantized and MatMulNBits), ``qkv_proj``, ``o_proj``,
    ``gate_up_proj``, ``down_proj``; a name matches that group in every layer, a graph name
    (``layers.0/mlp/gate_up_proj``) one node. Groups named in ``int8`` are stored with 8 bits in
    blocks of ``int8_block``, the rest with 4 bits in blocks of ``block``. ``asymmetric`` adds per-block zero
    points; ``gptq`` rounds the linear layers with GPTQ on calibration text (``act_order``: columns
    by decreasing Hessian diagonal; ``refit``: then re-solve each row's block scales for the least
    output error with the rounded codes fixed); ``accuracy_level`` is MatMulNBits' (4: int8
    activations inside the kernel, 0: float32).
    """

    block: int = 32
    int8: tuple[str, ...] = ("embed", "layers.0/mlp/gate_up_proj")
    int8_block: int = 128
    asymmetric: bool = True
    gptq: bool = True
    act_order: bool = True
    accuracy_level: int = 4
    refit: bool = True
    # Groups whose MatMulNBits runs at accuracy_level 0 (float32 activations) whatever
    # ``accuracy_level`` says.
    float_activations: tuple[str, ...] = ()
    # Groups stored as int8 blocks behind DequantizeLinear, which onnxruntime folds to a float32
    # MatMul at load (the int8 graph of before): exact activations, float32 bytes read per step.
    folded: tuple[str, ...] = ()
    # Quantization-aware distillation steps before rounding (export/onnx_distill.py; needs
    # torch at export time); 0: none. ``distill_lr`` is its peak learning rate.
    distill_steps: int = 0
    distill_lr: float = 7e-4
    distill_batch: int = 4
    # Tokens per distillation window (at most the context).
    distill_length: int = 256
    distill_seed: int = 0
    # Peak learning rate of the distillation's learned clipping (asymmetric schemes): each block's
    # range is its min/max times trained factors, and the weights are clamped to it before the
    # export rounds them; 0: plain min/max.
    distill_clip_lr: float = 0.0
    # Start the distillation from the GPTQ-rounded weights (then export with round-to-nearest,
    # which keeps those codes where training did not move them) instead of the float ones.
    distill_from_gptq: bool = False
    # SmoothQuant strength (smooth_weights) for int8 activations; 0: off.
    smooth: float = 0.0

    @staticmethod
    def _in(name: str, groups: tuple[str, ...]) -> bool:
        return any(name == g or name.endswith("/" + g) for g in groups)

    def _wide(self, name: str) -> bool:
        return self._in(name, self.int8)

    def level_for(self, name: str) -> int:
        return 0 if self._in(name, self.float_activations) else self.accuracy_level

    def folded_for(self, name: str) -> bool:
        return self._in(name, self.folded)

    def bits_for(self, name: str) -> int:
        return 8 if self._wide(name) else 4

    def block_for(self, name: str) -> int:
        return self.int8_block if self._wide(name) else self.block

    def row_block(self, name: str, row: int) -> int:
        """The block used for graph weight ``name`` with rows of ``row`` values. A block wider
        than the row would pad it, and the embedding lookup (GatherBlockQuantized) would then
        return the padding as extra features: small models (hidden 64) use the widest
        power-of-two block (at least 16, MatMulNBits' minimum) that fits in a row."""
        return min(self.block_for(name), max(16, 1 << (row.bit_length() - 1)))

    def with_(self, **changes: object) -> Int4Scheme:
        return replace(self, **changes)  # type: ignore[arg-type]

    def quantize(self, weight: np.ndarray, name: str, hessian: np.ndarray | None = None) -> QWeight:
        """``weight`` (N, K) of graph weight ``name``: GPTQ when ``hessian`` is given (and
        ``gptq``), else round-to-nearest (then the scales refit when ``refit`` and a Hessian)."""
        bits, block = self.bits_for(name), self.row_block(name, weight.shape[1])
        if self.gptq and hessian is not None:
            return gptq_weight(
                weight,
                hessian,
                bits,
                block,
                asymmetric=self.asymmetric,
                act_order=self.act_order,
                refit=self.refit,
            )
        qw = quantize_weight(weight, bits, block, asymmetric=self.asymmetric)
        if self.refit and hessian is not None:
            # Round to nearest (a distilled weight's codes), then the least-output-error scales.
            q = qw.packed
            if bits == 4:
                q = np.stack([q & 15, q >> 4], -1).reshape(*q.shape[:-1], -1)
            k = weight.shape[1]
            zeros = (
                qw.zero_points
                if qw.zero_points is not None
                else np.full(qw.scales.shape, 2 ** (bits - 1), np.uint8)
            )
            h = hessian.astype(np.float64)
            h = h + np.eye(k) * 0.01 * max(float(np.mean(np.diag(h))), 1e-12)
            scales = _refit_scales(weight, h, q.reshape(q.shape[0], -1)[:, :k], zeros, qw.scales, block)
            qw = replace(qw, scales=scales)
        return qw


# GPTQ (act-order, zero points, refit scales) on the shipped calibration text: the int4 default
# before quantization-aware distillation, and what an export without torch falls back to.
GPTQ_INT4 = Int4Scheme()
# The measured best passing combination on the bundled model (docs/onnx.md, "int4 choices"):
# the same storage, the weights distilled against the float model (300 steps of 4 x 384 tokens,
# peak LR 7e-4) with learned clipping (peak LR 5e-3), then rounded to nearest, which keeps exactly
# the codes the distillation trained. Clipping and the window length were chosen on two texts
# that are neither the parity text nor calibration text (docs/onnx.md).
DEFAULT_INT4 = Int4Scheme(
    gptq=False,
    refit=False,
    distill_steps=300,
    distill_batch=4,
    distill_lr=7e-4,
    distill_clip_lr=5e-3,
    distill_length=384,
)
# The scheme before 2026-12-03 (everything 4-bit, symmetric, natural column order).
PLAIN_INT4 = Int4Scheme(int8=(), asymmetric=False, act_order=False, refit=False)
# Every weight group of the graph, for schemes that put all of them at 8 bits.
ALL_GROUPS = ("embed", "qkv_proj", "o_proj", "gate_up_proj", "down_proj")
# ``--quantize int8``: 8-bit MatMulNBits with int8 activations (accuracy_level 4) for the tied
# table, q|k|v and gate|up: with o_proj/down_proj (below) about 2.6 MB of weights read per token
# instead of the 5.7 MB of every weight folded to float32. The activation rounding alone costs KL 2.6e-3 on this model (the int8 bound is
# 1e-3): SmoothQuant (alpha 0.5) moves activation outliers into the weights, blocks of 16 halve
# the rounding's reach, and o_proj and down_proj (inputs that cannot be smoothed, or the worst
# after smoothing) stay int8 behind DequantizeLinear, folded to float32 at load. docs/onnx.md.
DEFAULT_INT8 = Int4Scheme(
    int8=ALL_GROUPS,
    int8_block=16,
    asymmetric=False,
    act_order=False,
    refit=False,
    smooth=0.5,
    folded=("o_proj", "down_proj"),
)
# The int8 export before 2026-12-03: every weight (the table too) int8 behind DequantizeLinear.
LEGACY_INT8 = Int4Scheme(folded=ALL_GROUPS, asymmetric=False, act_order=False, refit=False)


def default_scheme(quantize: str) -> Int4Scheme:
    """The scheme ``build_model`` uses for ``quantize`` (int8 or int4) when none is given."""
    return DEFAULT_INT8 if quantize == "int8" else DEFAULT_INT4


def _block_params(blocks: np.ndarray, bits: int, asymmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scales and zero points (..., ) for blocks (..., block). Symmetric: the block's
    largest-magnitude weight maps to -2**(bits-1) (the q4_0 rule, the full signed range);
    asymmetric: min and max (each widened to include 0) map to 0 and 2**bits - 1."""
    half = 2 ** (bits - 1)
    if asymmetric:
        lo = np.minimum(blocks.min(-1), 0.0)
        hi = np.maximum(blocks.max(-1), 0.0)
        scales = ((hi - lo) / (2 * half - 1)).astype(np.float32)
        safe = np.where(scales == 0, np.float32(1), scales)
        zeros = np.clip(np.rint(-lo / safe), 0, 2 * half - 1)
        return scales, zeros.astype(np.uint8)
    idx = np.abs(blocks).argmax(-1)
    extreme = np.take_along_axis(blocks, idx[..., None], -1)[..., 0]
    return (extreme / -half).astype(np.float32), np.full(extreme.shape, half, np.uint8)


def _pack(q: np.ndarray, n: int, n_blocks: int, block: int, bits: int) -> np.ndarray:
    q = q.reshape(n, n_blocks, block)
    if bits == 4:
        q = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    return q


def quantize_weight(w: np.ndarray, bits: int, block: int, *, asymmetric: bool = False) -> QWeight:
    """Round-to-nearest blockwise quantization of ``w`` (N, K) along K (padding decodes to 0)."""
    n, k = w.shape
    n_blocks = -(-k // block)
    padded = np.zeros((n, n_blocks * block), dtype=np.float32)
    padded[:, :k] = w
    blocks = padded.reshape(n, n_blocks, block)
    scales, zeros = _block_params(blocks, bits, asymmetric)
    safe = np.where(scales == 0, np.float32(1), scales)
    q = np.clip(np.rint(blocks / safe[..., None]) + zeros[..., None], 0, 2**bits - 1).astype(np.uint8)
    return QWeight(_pack(q, n, n_blocks, block, bits), scales, zeros if asymmetric else None, bits, block)


def quantize_blockwise(w: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric blockwise quantization of ``w`` (N, K) along K, in MatMulNBits layout.

    Returns ``packed`` uint8 (N, n_blocks, block * bits / 8) and ``scales`` float32 (N, n_blocks).
    Stored values are ``q + 2**(bits-1)`` so the default zero point of MatMulNBits and
    GatherBlockQuantized applies.
    """
    qw = quantize_weight(w, bits, block)
    return qw.packed, qw.scales


def gptq_weight(
    w: np.ndarray,
    hessian: np.ndarray,
    bits: int,
    block: int,
    *,
    damp: float = 0.01,
    asymmetric: bool = False,
    act_order: bool = False,
    refit: bool = False,
) -> QWeight:
    """GPTQ (Frantar et al. 2022) in the layout of ``quantize_weight``: columns are rounded one at
    a time and each rounding error is spread over the not-yet-rounded columns along the inverse
    Hessian of the layer's inputs, so the layer's output error (not the weight error) is minimised.

    ``act_order`` visits columns by decreasing Hessian diagonal (the most-used inputs first, while
    the most columns remain to absorb their error). A block's scale (and zero point) is set from
    the error-updated weights when the first of its columns is reached, so the stored layout stays
    plain contiguous blocks whatever the order."""
    n, k = w.shape
    work = w.astype(np.float64).copy()
    h = hessian.astype(np.float64).copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    work[:, dead] = 0.0
    h += np.eye(k) * damp * max(float(np.mean(np.diag(h))), 1e-12)
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    where = np.empty(k, dtype=np.int64)
    where[perm] = np.arange(k)  # column c sits at position where[c] of the visiting order
    work = work[:, perm]
    hinv = np.linalg.cholesky(np.linalg.inv(h[np.ix_(perm, perm)])).T  # upper factor
    top = 2**bits - 1
    n_blocks = -(-k // block)
    q = np.zeros((n, n_blocks * block), dtype=np.uint8)
    scales = np.zeros((n, n_blocks), dtype=np.float32)
    zeros = np.full((n, n_blocks), 2 ** (bits - 1), dtype=np.uint8)
    ready = np.zeros(n_blocks, dtype=bool)
    for j in range(k):
        c = int(perm[j])
        b = c // block
        if not ready[b]:
            cols = where[b * block : min((b + 1) * block, k)]
            s, z = _block_params(work[:, cols], bits, asymmetric)
            scales[:, b], zeros[:, b] = s, z
            ready[b] = True
        s = scales[:, b]
        s64 = np.where(s == 0, 1.0, s.astype(np.float64))
        z64 = zeros[:, b].astype(np.float64)
        col = work[:, j]
        qj = np.clip(np.rint(col / s64) + z64, 0, top)
        q[:, c] = qj.astype(np.uint8)
        err = (col - (qj - z64) * s64) / hinv[j, j]
        work[:, j + 1 :] -= np.outer(err, hinv[j, j + 1 :])
    q[:, k:] = zeros[:, -1:]  # padding decodes to 0
    if refit:
        scales = _refit_scales(w, h, q[:, :k], zeros, scales, block)
    return QWeight(_pack(q, n, n_blocks, block, bits), scales, zeros if asymmetric else None, bits, block)


def _refit_scales(
    w: np.ndarray, h: np.ndarray, q: np.ndarray, zeros: np.ndarray, scales: np.ndarray, block: int
) -> np.ndarray:
    """With the integer codes fixed, the block scales of each row that minimise the layer's output
    error (w - C s)^T H (w - C s): a least-squares solve of n_blocks unknowns per row."""
    n, k = q.shape
    nb = scales.shape[1]
    onehot = np.zeros((k, nb))
    onehot[np.arange(k), np.arange(k) // block] = 1.0
    out = scales.copy()
    for r in range(n):
        c = q[r].astype(np.float64) - np.repeat(zeros[r].astype(np.float64), block)[:k]
        cb = c[:, None] * onehot  # (k, nb)
        a = cb.T @ h @ cb
        b = cb.T @ (h @ w[r].astype(np.float64))
        try:
            s = np.linalg.solve(a + np.eye(nb) * 1e-9 * np.trace(a), b)
        except np.linalg.LinAlgError:
            continue
        out[r] = s.astype(np.float32)
    return out


def gptq_blockwise(
    w: np.ndarray, hessian: np.ndarray, bits: int, block: int, damp: float = 0.01
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric GPTQ in natural column order: (packed, scales) as ``quantize_blockwise``."""
    qw = gptq_weight(w, hessian, bits, block, damp=damp)
    return qw.packed, qw.scales


def int8_blocks(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric blockwise int8 along K for DequantizeLinear: int8 (N, K), scales (N, n_blocks)."""
    packed, scales = quantize_blockwise(w, 8, block)
    q = (packed.reshape(w.shape[0], -1)[:, : w.shape[1]].astype(np.int16) - 128).astype(np.int8)
    return q, scales


def dequantize_blockwise(packed: np.ndarray, scales: np.ndarray, bits: int, k: int) -> np.ndarray:
    """Inverse of ``quantize_blockwise`` (for tests and error estimates)."""
    return QWeight(packed, scales, None, bits, packed.shape[-1] * 8 // bits).dequantize(k)


def smooth_weights(
    num_layers: int, weights: dict[str, np.ndarray], hessians: dict[str, np.ndarray], alpha: float
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Move activation outliers into the weights (SmoothQuant, Xiao et al. 2022) where the model
    allows it exactly: input channel c of a linear is divided by s_c and the weight's column c
    multiplied by it, s_c = rms(x_c)^alpha / max|W_c|^(1 - alpha). The division is folded into what
    produces the input: the RMSNorm weight before q|k|v and before gate|up, the up_proj row before
    down_proj (silu(gate) * up is linear in up). The float model computes the same function;
    int8 activations inside MatMulNBits (accuracy_level 4) lose less. Returns new weights and the
    Hessians of the scaled inputs (H / s s^T)."""
    w = dict(weights)
    h = dict(hessians)

    def scale(name: str, cols: list[str]) -> np.ndarray:
        rms = np.sqrt(np.maximum(np.diag(hessians[name]), 1e-30))
        wmax = np.max([np.abs(w[c]).max(0) for c in cols], axis=0).astype(np.float64)
        s = rms**alpha / np.maximum(wmax, 1e-12) ** (1 - alpha)
        s = s / np.exp(np.mean(np.log(s)))  # geometric mean 1: only the ratios matter
        for c in cols:
            w[c] = (w[c] * s[None, :]).astype(np.float32)
        h[name] = hessians[name] / np.outer(s, s)
        return s

    for i in range(num_layers):
        p = f"model.layers.{i}."
        attn = [p + f"self_attn.{k}_proj.weight" for k in "qkv"]
        s = scale(f"layers.{i}/attn/qkv_proj", attn)
        w[p + "input_layernorm.weight"] = (w[p + "input_layernorm.weight"] / s).astype(np.float32)
        s = scale(f"layers.{i}/mlp/gate_up_proj", [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"])
        w[p + "post_attention_layernorm.weight"] = (w[p + "post_attention_layernorm.weight"] / s).astype(
            np.float32
        )
        s = scale(f"layers.{i}/mlp/down_proj", [p + "mlp.down_proj.weight"])
        w[p + "mlp.up_proj.weight"] = (w[p + "mlp.up_proj.weight"] / s[:, None]).astype(np.float32)
    return w, h
