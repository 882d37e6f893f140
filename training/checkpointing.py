"""What a training snapshot holds besides the weights: the optimizer's moments as safetensors
tensors (no pickle), and the loss curve drawn from metrics.jsonl."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch


def optim_to_tensors(opt: torch.optim.Optimizer, names: list[str]) -> dict[str, torch.Tensor]:
    tensors = {}
    params = [p for g in opt.param_groups for p in g["params"]]
    for name, p in zip(names, params, strict=True):
        st = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in st:
                tensors[f"{name}.{key}"] = st[key].detach().cpu().contiguous()
        if "step" in st:
            tensors[f"{name}.step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1).cpu()
    return tensors


def optim_from_tensors(
    opt: torch.optim.Optimizer, names: list[str], tensors: dict[str, torch.Tensor]
) -> None:
    params = [p for g in opt.param_groups for p in g["params"]]
    for name, p in zip(names, params, strict=True):
        if f"{name}.exp_avg" not in tensors:
            continue
        opt.state[p] = {
            "step": tensors[f"{name}.step"].reshape(()).clone(),
            "exp_avg": tensors[f"{name}.exp_avg"].to(p.device).clone(),
            "exp_avg_sq": tensors[f"{name}.exp_avg_sq"].to(p.device).clone(),
        }


def plot_metrics(metrics: Path, png: Path) -> None:
    """Redraw the loss curve (train and validation against tokens). Written atomically."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    trained = [r for r in rows if "loss" in r]  # the step-0 row of a fine-tune has val_loss only
    ax.plot([r["tokens"] / 1e6 for r in trained], [r["loss"] for r in trained], label="train", lw=1)
    val = [r for r in rows if "val_loss" in r]
    if val:
        ax.plot(
            [r["tokens"] / 1e6 for r in val], [r["val_loss"] for r in val], "o-", label="validation", ms=3
        )
    ax.set_xlabel("tokens (millions)")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("GPT-S training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png)
