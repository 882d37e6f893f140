"""The optimizer's parameter groups and the regularizers a fine-tune can use against over-fitting.

150 steps of 8 x 384 tokens are six passes over 250 KB of text. None of these levers helped the
finetune preset on Jeeves (README, "Fine-tune on your own text": EMA -13.8 %, dropout -13.0 %,
frozen embedding -12.8 %, L2-SP -13.2 %, against -13.9 % without them), so all are off by
default and reachable from Python (``TrainConfig``):

- ``ema``: an exponential moving average of the weights (decay per optimizer step), started at
  the initial weights. It is evaluated beside the raw weights and, with ``--keep best``, the
  better of the two is kept. A snapshot stores it for ``--resume``.
- ``embed_lr_scale``: the tied embedding/head (37 % of the parameters) learns at this fraction
  of the LR; 0 freezes it.
- ``decay_to_init``: weight decay pulls the matrices toward the initial weights instead of toward
  zero (L2-SP), decoupled as in AdamW: ``p -= lr * wd * (p - p0)`` each step.

Dropout is a field of the model (``GPTS(cfg, dropout=...)``), active in train mode only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

EMBED = "embed_tokens.weight"


def optimizer(
    model: torch.nn.Module,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    embed_lr_scale: float = 1.0,
    fused: bool = False,
) -> tuple[torch.optim.AdamW, list[str]]:
    """AdamW over: matrices (weight decay), norms (none), and, when its LR differs, the
    embedding/head in a group of its own. Returns the optimizer and the parameter names in the
    groups' order (the names a snapshot's optimizer moments are saved under).

    Each group's ``lr_scale`` multiplies the scheduled LR; a frozen embedding (scale 0) is left
    out of the optimizer and gets no gradient."""
    named = list(model.named_parameters())
    split_embed = embed_lr_scale != 1.0
    if split_embed and embed_lr_scale == 0.0:
        dict(named)[EMBED].requires_grad_(False)
    groups: list[tuple[list[tuple[str, torch.nn.Parameter]], float, float]] = [
        ([(n, p) for n, p in named if p.ndim >= 2 and not (split_embed and n == EMBED)], weight_decay, 1.0),
        ([(n, p) for n, p in named if p.ndim < 2], 0.0, 1.0),
    ]
    if split_embed and embed_lr_scale > 0.0:
        groups.append(([(n, p) for n, p in named if n == EMBED], weight_decay, embed_lr_scale))
    opt = torch.optim.AdamW(
        [{"params": [p for _, p in g], "weight_decay": wd, "lr_scale": s} for g, wd, s in groups],
        lr=lr,
        betas=betas,
        eps=1e-8,
        fused=fused,
    )
    return opt, [n for g, _, _ in groups for n, _ in g]


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


class WeightEMA:
    """An exponential moving average of a model's parameters (buffers hold nothing trained)."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), found {decay}")
        self.decay = decay
        self.names = [n for n, _ in model.named_parameters()]
        self.shadow = [p.detach().clone() for _, p in model.named_parameters()]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        params = [p.detach() for _, p in model.named_parameters()]
        torch._foreach_lerp_(self.shadow, params, 1.0 - self.decay)

    @contextmanager
    @torch.no_grad()
    def swapped_in(self, model: torch.nn.Module) -> Iterator[None]:
        """The model holds the average inside the block and its own weights again after it."""
        params = [p for _, p in model.named_parameters()]
        saved = [p.detach().clone() for p in params]
        for p, s in zip(params, self.shadow, strict=True):
            p.copy_(s)
        try:
            yield
        finally:
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {n: s.detach().cpu().contiguous() for n, s in zip(self.names, self.shadow, strict=True)}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        for n, s in zip(self.names, self.shadow, strict=True):
            s.copy_(tensors[n])


class DecayToInit:
    """L2-SP: after AdamW's decoupled decay toward zero, ``p *= 1 - lr * wd``, adding back
    ``lr * wd * p0`` makes it a decay toward the initial weights ``p0``."""

    def __init__(self, opt: torch.optim.Optimizer, initial: dict[int, torch.Tensor]) -> None:
        self.opt = opt
        self.anchors = [
            (p, initial[id(p)]) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]
        ]
        self.rates = [g for g in opt.param_groups if g["weight_decay"] > 0 for _ in g["params"]]

    @torch.no_grad()
    def after_step(self) -> None:
        for (p, p0), g in zip(self.anchors, self.rates, strict=True):
            p.add_(p0, alpha=g["lr"] * g["weight_decay"])


def initial_copies(model: torch.nn.Module) -> dict[int, torch.Tensor]:
    return {id(p): p.detach().clone() for p in model.parameters()}


def describe(tc: Any) -> str:
    """One line naming the regularizers that are on (empty when none)."""
    parts = []
    if getattr(tc, "ema", 0.0):
        parts.append(f"EMA of the weights (decay {tc.ema})")
    if getattr(tc, "dropout", 0.0):
        parts.append(f"dropout {tc.dropout}")
    if getattr(tc, "embed_lr_scale", 1.0) != 1.0:
        s = tc.embed_lr_scale
        parts.append("embedding frozen" if s == 0 else f"embedding LR x{s}")
    if getattr(tc, "decay_to_init", False):
        parts.append(f"weight decay {tc.weight_decay} toward the initial weights")
    return ", ".join(parts)
