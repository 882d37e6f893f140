"""Parity treats a NaN anywhere as a failure (a broken export must never read as "identical")."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np

from gpts_edge.parity import _text_rows, fp32_rows, text_figures

VOCAB = 16


class _Fake:
    """A Runtime whose logits are a fixed function of the tokens; ``nan`` poisons every output."""

    def __init__(self, nan: bool) -> None:
        self.config = SimpleNamespace(vocab_size=VOCAB, context_length=64)
        self.nan = nan

    def _logits(self, ids: np.ndarray) -> np.ndarray:
        out = np.sin(np.arange(VOCAB)[None, :] * (ids[..., None] + 1.0)).astype(np.float32)
        return np.full_like(out, np.nan) if self.nan else out

    def new_cache(self) -> list[int]:
        return []

    def step(self, tokens: np.ndarray, cache: list[int]) -> tuple[np.ndarray, list[int]]:
        return self._logits(np.asarray(tokens)[-1:])[0], cache + list(tokens)

    def forward_logits(self, ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        return self._logits(np.asarray(ids))


def test_nan_logits_fail_every_check_and_report_no_value() -> None:
    ref, bad = _Fake(nan=False), _Fake(nan=True)
    windows = np.arange(2 * 64).reshape(2, 64) % VOCAB
    figs = text_figures(ref, bad, windows)
    assert math.isnan(figs["max_abs_diff"]) and figs["top1_agreement"] == 0.0
    rows = _text_rows("text", figs, "onnx", "none")
    assert not any(r["ok"] for r in rows)
    assert rows[0]["value"] is None  # NaN is shown as null in --json, never as a number
    fp_rows, _ = fp32_rows(ref, bad, windows.reshape(-1))
    failed = {r["check"].split(" ")[0] for r in fp_rows if not r["ok"]}
    assert {"prefill", "batch", "context"} <= failed


def test_identical_runtimes_pass_the_same_checks() -> None:
    ref = _Fake(nan=False)
    windows = np.arange(2 * 64).reshape(2, 64) % VOCAB
    figs = text_figures(ref, _Fake(nan=False), windows)
    assert figs["max_abs_diff"] == 0.0 and figs["top1_agreement"] == 1.0
    assert all(r["ok"] for r in _text_rows("text", figs, "onnx", "none"))
