"""Quantization-aware distillation for the int4 export: before the weights are rounded, a short
training run moves them to where the exporter's own rounding loses the least.

The student is the float model with every weight the scheme quantizes replaced, in its forward
pass, by exactly what the export stores (the same blocks, bits, scales, zero points and
round-half-even as ``onnx_quant.quantize_weight``) with a straight-through gradient; the RMSNorm
weights (stored as float32) train freely. It learns to match the float32 model's next-token
distribution (KL) on the shipped calibration text (``onnx_calibration.text_ids``; never the
parity text). With learned clipping (the int4 default) each block's range trains too, and the
weights are clamped to it at the end. The export then rounds the trained weights to nearest,
which reproduces the student's weights code for code, so the file computes what was trained.
The result is kept in the user cache (``_distilled``), so one checkpoint distils once.

Needs torch (at export time only; running the export does not). Self-contained on purpose:
exporters do not import the training package.
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from gpts_edge.config import ModelConfig
from gpts_edge.export.onnx_quant import GPTQ_INT4, Int4Scheme, default_scheme, smooth_weights
from gpts_edge.fileio import atomic_file, cache_root


@dataclass(frozen=True)
class DistillConfig:
    """The run: ``steps`` Adam steps of ``batch`` windows of ``length`` calibration tokens, peak
    learning rate ``lr`` (linear warm-up over the first 5 %, cosine decay to zero), fixed seed."""

    steps: int = 300
    batch: int = 4
    length: int = 256
    lr: float = 7e-4
    seed: int = 0
    # Peak learning rate of the learned clipping factors (``fake_quantize``'s ``clip``); 0: none,
    # every block keeps its min/max range.
    clip_lr: float = 0.0
    # One thread: the same bytes on every machine (a reduction's order depends on the thread
    # count), and no threads spinning on each other on a busy machine; 0: torch's default.
    threads: int = 1


DEFAULT_DISTILL = DistillConfig()


def graph_name(param: str) -> str | None:
    """The graph group a checkpoint weight is quantized in (``Int4Scheme``'s names), or None
    for weights stored as float32 (the RMSNorm weights)."""
    if param == "embed_tokens.weight":
        return "embed"
    parts = param.split(".")
    if parts[0] != "layers" or not param.endswith("_proj.weight"):
        return None
    i, kind = parts[1], parts[3]
    group = {
        "q_proj": "attn/qkv_proj",
        "k_proj": "attn/qkv_proj",
        "v_proj": "attn/qkv_proj",
        "o_proj": "attn/o_proj",
        "gate_proj": "mlp/gate_up_proj",
        "up_proj": "mlp/gate_up_proj",
        "down_proj": "mlp/down_proj",
    }[kind]
    return f"layers.{i}/{group}"


# A clipping factor is sigmoid(logit); this start is 0.982, close to the block's own range.
CLIP_LOGIT_START = 4.0


def _blocks(w: Any, block: int) -> Any:
    """``w`` (N, K) as (N, blocks, block), the last block zero-padded (as the export pads)."""
    import torch.nn.functional as F

    n, k = w.shape
    n_blocks = -(-k // block)
    return F.pad(w, (0, n_blocks * block - k)).view(n, n_blocks, block)


def _clip_range(b: Any, clip: tuple[Any, Any]) -> tuple[Any, Any]:
    """The learned range of each block of ``b``: its min and max (each widened to include 0, as
    the export's asymmetric rule does) times the factors ``clip`` (N, blocks), each in (0, 1]."""
    return b.amin(-1).clamp(max=0.0) * clip[0], b.amax(-1).clamp(min=0.0) * clip[1]


def fake_quantize(
    w: Any, bits: int, block: int, asymmetric: bool, clip: tuple[Any, Any] | None = None
) -> Any:
    """``w`` (N, K) as the export stores it (onnx_quant.quantize_weight's rounding, in torch)
    with a straight-through gradient: the forward value is the dequantized weight, the backward
    pass treats the rounding as the identity.

    ``clip``: learned clipping (OmniQuant's LWC), asymmetric only. Each block is first clamped to
    ``_clip_range`` and then rounded by the export's min/max rule; the clamped block's min and max
    are that range exactly, so exporting ``clip_weight(w)`` with the plain rule stores these very
    codes. The gradient reaches the factors through the range (the scale, and the clamped
    weights, which equal its ends)."""
    import torch

    n, k = w.shape
    b = _blocks(w, block)
    top = 2**bits - 1
    if clip is not None:
        if not asymmetric:
            raise ValueError("learned clipping needs an asymmetric scheme (min and max of each block)")
        lo, hi = _clip_range(b, clip)
        b = torch.minimum(torch.maximum(b, lo[..., None]), hi[..., None])
        s = (hi - lo) / top
        safe = torch.where(s == 0, torch.ones_like(s), s)
        z = torch.clamp(_round_ste(-lo / safe), 0, top)
        q = torch.clamp(_round_ste(b / safe[..., None]) + z[..., None], 0, top)
        return ((q - z[..., None]) * s[..., None]).reshape(n, -1)[:, :k]
    with torch.no_grad():
        if asymmetric:
            lo = b.amin(-1).clamp(max=0.0)
            hi = b.amax(-1).clamp(min=0.0)
            s = (hi - lo) / top
            safe = torch.where(s == 0, torch.ones_like(s), s)
            z = torch.clamp(torch.round(-lo / safe), 0, top)
        else:
            half = 2 ** (bits - 1)
            extreme = torch.gather(b, -1, b.abs().argmax(-1, keepdim=True))[..., 0]
            s = extreme / -half
            safe = torch.where(s == 0, torch.ones_like(s), s)
            z = torch.full_like(s, half)
        q = torch.clamp(torch.round(b / safe[..., None]) + z[..., None], 0, top)
        deq = ((q - z[..., None]) * s[..., None]).reshape(n, -1)[:, :k]
    return w + (deq - w).detach()


def _round_ste(x: Any) -> Any:
    """Round half to even forward, identity backward."""
    import torch

    return x + (torch.round(x) - x).detach()


def clip_weight(w: Any, block: int, clip: tuple[Any, Any]) -> Any:
    """``w`` (N, K) with each block clamped to its learned range: what the export rounds."""
    import torch

    n, k = w.shape
    b = _blocks(w, block)
    lo, hi = _clip_range(b, clip)
    return torch.minimum(torch.maximum(b, lo[..., None]), hi[..., None]).reshape(n, -1)[:, :k]


def distill_weights(
    cfg: ModelConfig,
    weights: dict[str, np.ndarray],
    tokenizer: Any,
    scheme: Int4Scheme,
    run: DistillConfig = DEFAULT_DISTILL,
    *,
    start: dict[str, np.ndarray] | None = None,
    ids: np.ndarray | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, np.ndarray]:
    """``weights`` (checkpoint names, float32: the teacher) after quantization-aware distillation
    under ``scheme``, starting from ``start`` (default: the weights themselves); same names and
    shapes. ``ids`` (windows, length) replaces the shipped calibration text (tests)."""
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.nn.utils import parametrize

    from gpts_edge.export.onnx_calibration import text_ids
    from gpts_edge.model import GPTS, state_to_weights, weights_to_state

    threads = torch.get_num_threads()
    if run.threads:
        torch.set_num_threads(run.threads)
    try:
        torch.manual_seed(run.seed)
        teacher = GPTS(cfg)
        teacher.load_state_dict(weights_to_state(weights))
        teacher.eval().requires_grad_(False)
        student = copy.deepcopy(teacher).train().requires_grad_(True)
        if start is not None:
            student.load_state_dict(weights_to_state(start))

        class _Fake(nn.Module):
            def __init__(self, bits: int, block: int, asymmetric: bool, clip: tuple[int, int] | None) -> None:
                super().__init__()
                self.bits, self.block, self.asymmetric = bits, block, asymmetric
                self.clip: nn.ParameterList | None = None
                if clip is not None:  # logits of the (lo, hi) factors, one pair per block
                    self.clip = nn.ParameterList(
                        [nn.Parameter(torch.full(clip, CLIP_LOGIT_START)) for _ in range(2)]
                    )

            def factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
                return None if self.clip is None else (self.clip[0].sigmoid(), self.clip[1].sigmoid())

            def forward(self, w: torch.Tensor) -> torch.Tensor:
                return fake_quantize(w, self.bits, self.block, self.asymmetric, self.factors())

        fakes: list[tuple[nn.Module, _Fake]] = []
        for pname, p in list(student.named_parameters()):
            group = graph_name(pname)
            if group is None:
                continue
            owner = student.get_submodule(pname.rsplit(".", 1)[0])
            block = scheme.row_block(group, p.shape[1])
            clip = (p.shape[0], -(-p.shape[1] // block)) if run.clip_lr else None
            fq = _Fake(scheme.bits_for(group), block, scheme.asymmetric, clip)
            parametrize.register_parametrization(owner, "weight", fq)
            fakes.append((owner, fq))

        if ids is None:
            ids = text_ids(tokenizer, min(run.length, cfg.context_length))
        data = torch.as_tensor(np.asarray(ids, dtype=np.int64))
        gen = torch.Generator().manual_seed(run.seed)
        clips = {id(c) for _, fq in fakes if fq.clip is not None for c in fq.clip}
        groups = [{"params": [q for q in student.parameters() if id(q) not in clips], "peak": run.lr}]
        if clips:
            groups.append({"params": [c for _, fq in fakes for c in fq.clip or ()], "peak": run.clip_lr})
        opt = torch.optim.Adam(groups, lr=run.lr, betas=(0.9, 0.95))
        warm = max(1, run.steps // 20)
        t0 = time.perf_counter()
        for step in range(run.steps):
            f = min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * step / run.steps))
            for group in opt.param_groups:
                group["lr"] = group["peak"] * f
            batch = data[torch.randint(len(data), (min(run.batch, len(data)),), generator=gen)]
            with torch.no_grad():
                target = F.log_softmax(teacher(batch)[0].float(), -1).flatten(0, 1)
            pred = F.log_softmax(student(batch)[0].float(), -1).flatten(0, 1)
            loss = F.kl_div(pred, target, log_target=True, reduction="batchmean")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if log is not None and (step % 25 == 0 or step == run.steps - 1):
                log(
                    f"       distill step {step + 1}/{run.steps}: KL {loss.item():.4f} ({time.perf_counter() - t0:.0f} s)"
                )
        for owner, fq in fakes:
            factors = fq.factors()
            parametrize.remove_parametrizations(owner, "weight", leave_parametrized=False)
            if factors is not None:
                with torch.no_grad():
                    owner.weight.copy_(clip_weight(owner.weight, fq.block, factors))
        out = state_to_weights(student)
    finally:
        torch.set_num_threads(threads)
    return {k: out[k].astype(np.float32) for k in weights}


def quantization_inputs(
    cfg: ModelConfig,
    weights: dict[str, np.ndarray],
    tokenizer: Any,
    quantize: str,
    scheme: Int4Scheme | None,
    log: Callable[[str], None],
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None, Int4Scheme]:
    """What ``build_model`` quantizes for ``quantize`` under ``scheme`` (None: the default for
    ``quantize``): the weights (distilled or smoothed when the scheme asks for it), the
    calibration Hessians (for GPTQ; None when nothing uses them) and the scheme to build with
    (GPTQ_INT4 when distillation was asked for but torch is missing, said to ``log``)."""
    from gpts_edge.export.onnx_calibration import calibration_hessians

    scheme = scheme or default_scheme(quantize)
    if quantize == "none":
        return weights, None, scheme
    if scheme.distill_steps and not _has_torch():
        log(
            f"       note: torch is not installed, so {quantize} is rounded with GPTQ instead of being "
            "distilled first (less accurate: docs/onnx.md); pip install 'gpts-edge[export]' for the default"
        )
        scheme = GPTQ_INT4
    if scheme.distill_steps:
        start = None
        if scheme.distill_from_gptq:
            log(
                f"       calibrating {quantize} (GPTQ on the shipped calibration text, the distillation's start)"
            )
            start = gptq_rounded(weights, calibration_hessians(cfg, weights, tokenizer=tokenizer), scheme)
        run = DistillConfig(
            steps=scheme.distill_steps,
            lr=scheme.distill_lr,
            clip_lr=scheme.distill_clip_lr,
            batch=scheme.distill_batch,
            length=scheme.distill_length,
            seed=scheme.distill_seed,
        )
        weights = _distilled(cfg, weights, tokenizer, scheme, run, start, quantize, log)
    if not (scheme.gptq or scheme.refit) and not scheme.folded and not scheme.smooth:
        return weights, None, scheme
    log(f"       calibrating {quantize} (GPTQ on the shipped calibration text)")
    hessians = calibration_hessians(cfg, weights, tokenizer=tokenizer)
    if scheme.smooth:
        weights, hessians = smooth_weights(cfg.num_layers, weights, hessians, scheme.smooth)
    return weights, hessians, scheme


def _distilled(
    cfg: ModelConfig,
    weights: dict[str, np.ndarray],
    tokenizer: Any,
    scheme: Int4Scheme,
    run: DistillConfig,
    start: dict[str, np.ndarray] | None,
    quantize: str,
    log: Callable[[str], None],
) -> dict[str, np.ndarray]:
    """``distill_weights``, kept in the user cache (``distilled/<key>.safetensors``) under a key
    of everything its result depends on: the weights (and start), the scheme's rounding, the run,
    the calibration tokens and the torch version. An export of the same checkpoint as ONNX, ORT and
    transformers.js then distils once. A cache that cannot be read or written is skipped."""
    import torch
    from safetensors.numpy import load_file, save_file

    from gpts_edge.export.onnx_calibration import text_ids

    ids = text_ids(tokenizer, min(run.length, cfg.context_length))
    h = hashlib.sha256(b"gpts-edge distilled weights 2")
    for tag, group in (("w", weights), ("s", start or {})):
        for name in sorted(group):
            arr = np.ascontiguousarray(group[name], dtype=np.float32)
            h.update(f"{tag}:{name}:{arr.shape}".encode())
            h.update(arr.tobytes())
    # Of the scheme, only what the student's rounding reads (bits_for, row_block, asymmetric):
    # schemes that differ in how the result is then stored or run (GPTQ, refit, accuracy level,
    # folded groups) share one entry. A GPTQ start is in the key through its weights.
    rounding = (scheme.block, scheme.int8, scheme.int8_block, scheme.asymmetric)
    h.update(f"{rounding!r}|{run!r}|torch {torch.__version__}".encode())
    h.update(np.ascontiguousarray(ids, dtype=np.int64).tobytes())
    path = cache_root() / "distilled" / f"{h.hexdigest()[:32]}.safetensors"
    try:
        cached = load_file(str(path)) if path.is_file() else None
    except Exception:  # a damaged entry is distilled again and replaced
        cached = None
    if cached is not None and {k: v.shape for k, v in cached.items()} == {
        k: v.shape for k, v in weights.items()
    }:
        log(f"       distilled {quantize} weights reused from {path} (same checkpoint, scheme and text)")
        return {k: cached[k].astype(np.float32) for k in weights}
    log(f"       distilling {quantize} ({run.steps} steps on the shipped calibration text)")
    out = distill_weights(cfg, weights, tokenizer, scheme, run, start=start, ids=ids, log=log)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp:
            save_file({k: np.ascontiguousarray(v) for k, v in out.items()}, str(tmp))
    except OSError:
        pass  # a read-only or full cache: the export goes on without it
    return out


def _has_torch() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def gptq_rounded(
    weights: dict[str, np.ndarray], hessians: dict[str, np.ndarray], scheme: Int4Scheme
) -> dict[str, np.ndarray]:
    """Each layer weight replaced by its GPTQ rounding under ``scheme`` (dequantized, per
    checkpoint weight: the graph's fused groups are rounded row by row, so q, k and v can be
    rounded apart with the fused group's Hessian); the table and norms unchanged."""
    out = dict(weights)
    plain = scheme.with_(refit=False)  # refit scales are not min/max ones: RTN would not keep them
    for name, w in weights.items():
        group = graph_name(name.removeprefix("model."))
        if group is None or group not in hessians:
            continue
        out[name] = plain.quantize(w, group, hessians[group]).dequantize(w.shape[1])
    return out
