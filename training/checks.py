"""Checks on a training run's settings, before any work: every number in range (one `error:`
line naming the option), and on ``--resume``, the saved settings against the new ones, since a
changed learning rate, batch or data silently continued is a different run under the same name."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from gpts_edge.errors import GptsError
from gpts_edge.training.data import check_sampling

# Settings whose change turns a resumed run into a different run. The rest (logging, checkpoint
# cadence, device, progress bar, stop_at) may change freely between invocations.
RESUME_KEYS = (
    "data",
    "preset",
    "init",
    "tokenizer",
    "decontaminate",
    "val_fraction",
    "seed",
    "lr",
    "warmup",
    "decay_start_frac",
    "weight_decay",
    "betas",
    "grad_clip",
    "batch_size",
    "grad_accum",
    "seq_len",
    "max_steps",
    "tokens",
    "epochs",
    "dtype",
)


def _positive_int(name: str, value: Any, allow_zero: bool = False) -> None:
    if value is None:
        return
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise GptsError(f"--{name}: expected an integer >= {low}, found {value}")


def _positive_float(name: str, value: Any, allow_zero: bool = False) -> None:
    if value is None:
        return
    ok = (
        isinstance(value, (int, float)) and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    )
    if not ok:
        raise GptsError(
            f"--{name}: expected a finite number {'>= 0' if allow_zero else '> 0'}, found {value}"
        )


def check_train_config(tc: Any) -> None:
    """Every number of a TrainConfig in range, the output and tokenizer paths usable."""
    positive = ("batch_size", "grad_accum", "log_every", "ckpt_every", "eval_windows", "keep_snapshots")
    for name in (*positive, "max_steps", "tokens", "seq_len"):  # the last three may be absent (None)
        _positive_int(name.replace("_", "-"), getattr(tc, name))
    # 0 means "sized to the run" for the finetune preset.
    _positive_int("warmup", tc.warmup, allow_zero=True)
    _positive_int("eval-every", tc.eval_every, allow_zero=True)
    _positive_int("stop-at", tc.stop_at, allow_zero=True)
    _positive_int("cpu-micro-batch", tc.cpu_micro_batch, allow_zero=True)
    _positive_float("lr", tc.lr)
    _positive_float("grad-clip", tc.grad_clip)
    _positive_float("weight-decay", tc.weight_decay, allow_zero=True)
    _positive_float("time-limit", tc.time_limit)
    _positive_float("epochs", tc.epochs)
    _positive_float("ckpt-seconds", tc.ckpt_seconds)
    if not 0 <= tc.decay_start_frac <= 1:
        raise GptsError(f"decay_start_frac: expected a fraction in [0, 1], found {tc.decay_start_frac}")
    if tc.val_fraction is not None and not (math.isfinite(tc.val_fraction) and 0 < tc.val_fraction < 1):
        raise GptsError(f"--val-fraction: expected a fraction between 0 and 1, found {tc.val_fraction}")
    # Choices too, before the data is tokenized into the output folder.
    check_sampling(tc.sampling)
    if tc.keep not in ("best", "last"):
        raise GptsError(f"--keep: expected best or last, found {tc.keep!r}")
    out = Path(tc.out)
    if out.exists() and not out.is_dir():
        raise GptsError(f"--output {out}: exists and is not a folder (a run writes a folder)")
    if out.is_dir() and not os.access(out, os.W_OK):
        raise GptsError(f"--output {out}: folder is not writable")
    if tc.tokenizer is not None and not Path(tc.tokenizer).is_file():
        raise GptsError(f"--tokenizer {tc.tokenizer}: file not found (expected a tokenizer.json)")


def _norm(value: Any) -> Any:
    """JSON's view of a value, so a tuple saved as a list compares equal."""
    return json.loads(json.dumps(value))


def resume_differences(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{key: (saved, now)} for every RESUME_KEYS setting that differs. A setting not given now
    (None) keeps the saved one and is no difference."""
    diffs = {}
    for key in RESUME_KEYS:
        if key not in saved or current.get(key) is None:
            continue
        if _norm(saved[key]) != _norm(current[key]):
            diffs[key] = (saved[key], current[key])
    return diffs


def parse_overrides(spec: str | None) -> set[str]:
    """``--override-resume lr,max_steps`` -> {"lr", "max_steps"} (dashes or underscores)."""
    if not spec:
        return set()
    keys = {k.strip().replace("-", "_") for k in spec.split(",") if k.strip()}
    unknown = sorted(keys - set(RESUME_KEYS))
    if unknown:
        raise GptsError(
            f"--override-resume: unknown setting {unknown[0]!r}; settings checked on resume: {', '.join(RESUME_KEYS)}"
        )
    return keys


def check_resume(snapshot: Path, saved: dict[str, Any], current: dict[str, Any], overrides: set[str]) -> None:
    diffs = {k: v for k, v in resume_differences(saved, current).items() if k not in overrides}
    if diffs:
        listed = "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diffs.items())
        raise GptsError(
            f"{snapshot}: --resume with changed settings ({listed}); keep them, or name the ones to "
            f"change with --override-resume {','.join(diffs)}"
        )


def trim_metrics(metrics: Path, step: int) -> int:
    """Drop the metrics.jsonl rows logged after ``step`` (the snapshot a run resumes from): those
    steps run again and would otherwise appear twice. Returns how many rows were dropped."""
    if not metrics.is_file():
        return 0
    lines = metrics.read_text().splitlines()
    keep = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        if isinstance(row, dict) and row.get("step", 0) <= step:
            keep.append(line)
    dropped = len(lines) - len(keep)
    if dropped:
        tmp = metrics.with_name(f".{metrics.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, metrics)
    return dropped
