"""Warmup-stable-decay learning rate: linear warmup, flat, then linear decay to 0.

Because the flat phase does not depend on the run's length, a run can be extended with
``--resume --max-steps LARGER`` as long as the decay has not started.
"""

from __future__ import annotations


def wsd_lr(step: int, *, peak: float, warmup: int, total: int, decay_start_frac: float = 0.8) -> float:
    """LR for optimizer step ``step`` (0-based) of ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    decay_start = int(total * decay_start_frac)
    if step < decay_start:
        return peak
    return peak * max(0.0, (total - step) / max(1, total - decay_start))
