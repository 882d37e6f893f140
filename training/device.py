"""Where a training process runs: its rank in a ``torchrun`` launch and its device."""

from __future__ import annotations

import os

import torch

from gpts_edge.errors import GptsError


def dist_info() -> tuple[int, int, int]:
    return (
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
        int(os.environ.get("LOCAL_RANK", 0)),
    )


def pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise GptsError("--device cuda: no CUDA device is available")
        return torch.device("cuda", local_rank if name == "cuda" else int(name.split(":")[1]))
    if name != "cpu":
        raise GptsError(f"--device: expected auto, cpu or cuda[:N], found {name!r}")
    return torch.device("cpu")
