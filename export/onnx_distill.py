"""Quantization-aware distillation for the int4 export: before the weights are rounded, a short
training run moves them to where the exporter's own rounding loses the least.

The student is the float model with every weight the scheme quantizes replaced, in its forward
pass, by exactly what the export stores (the same blocks, bits, scales, zero points and
round-half-even as ``onnx_quant.quantize_weight``) with a straight-through gradient; the RMSNorm
weights (stored as float32) train freely. It learns to match the float32 model's next-token
distribution (KL) on the shipped calibration text (``onnx_calibration.text_ids``; never the
parity text). The export then rounds the trained weights to nearest, which reproduces the
student's weights code for code, so the file computes what was trained.

Needs torch (at export time only; running the export does not). Self-contained on purpose:
exporters do not import the training package.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from gpts_edge.config import ModelConfig
from gpts_edge.export.onnx_quant import GPTQ_INT4, Int4Scheme, default_scheme, smooth_weights


@dataclass(frozen=True)
class DistillConfig:
    """The run: ``steps`` Adam steps of ``batch`` windows of ``length`` calibration tokens, peak
    learning rate ``lr`` (linear warm-up over the first 5 %, cosine decay to zero), fixed seed."""

    steps: int = 300
    batch: int = 4
    length: int = 256
    lr: float = 7e-4
    seed: int = 0
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


def fake_quantize(w: Any, bits: int, block: int, asymmetric: bool) -> Any:
    """``w`` (N, K) as the export stores it (onnx_quant.quantize_weight's rounding, in torch)
    with a straight-through gradient: the forward value is the dequantized weight, the backward
    pass treats the rounding as the identity."""
    import torch
    import torch.nn.functional as F

    n, k = w.shape
    n_blocks = -(-k // block)
    b = F.pad(w, (0, n_blocks * block - k)).view(n, n_blocks, block)
    top = 2**bits - 1
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
            def __init__(self, bits: int, block: int, asymmetric: bool) -> None:
                super().__init__()
                self.bits, self.block, self.asymmetric = bits, block, asymmetric

            def forward(self, w: torch.Tensor) -> torch.Tensor:
                return fake_quantize(w, self.bits, self.block, self.asymmetric)

        for pname, p in list(student.named_parameters()):
            group = graph_name(pname)
            if group is None:
                continue
            owner = student.get_submodule(pname.rsplit(".", 1)[0])
            fq = _Fake(scheme.bits_for(group), scheme.row_block(group, p.shape[1]), scheme.asymmetric)
            parametrize.register_parametrization(owner, "weight", fq)

        if ids is None:
            ids = text_ids(tokenizer, min(run.length, cfg.context_length))
        data = torch.as_tensor(np.asarray(ids, dtype=np.int64))
        gen = torch.Generator().manual_seed(run.seed)
        opt = torch.optim.Adam(student.parameters(), lr=run.lr, betas=(0.9, 0.95))
        warm = max(1, run.steps // 20)
        t0 = time.perf_counter()
        for step in range(run.steps):
            lr = run.lr * min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * step / run.steps))
            for group in opt.param_groups:
                group["lr"] = lr
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
        for module in list(student.modules()):
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
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
        log(f"       distilling {quantize} ({scheme.distill_steps} steps on the shipped calibration text)")
        run = DistillConfig(
            steps=scheme.distill_steps,
            lr=scheme.distill_lr,
            batch=scheme.distill_batch,
            seed=scheme.distill_seed,
        )
        weights = distill_weights(cfg, weights, tokenizer, scheme, run, start=start, log=log)
    if not (scheme.gptq or scheme.refit) and not scheme.folded and not scheme.smooth:
        return weights, None, scheme
    log(f"       calibrating {quantize} (GPTQ on the shipped calibration text)")
    hessians = calibration_hessians(cfg, weights, tokenizer=tokenizer)
    if scheme.smooth:
        weights, hessians = smooth_weights(cfg.num_layers, weights, hessians, scheme.smooth)
    return weights, hessians, scheme


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
