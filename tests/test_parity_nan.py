"""Parity treats a NaN anywhere as a failure (a broken export must never read as "identical")."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np

from gpts_edge.parity import _text_rows, fp32_rows, text_figures

VOCAB = 16


class _Fake:
    """A Runtime whose logits are a fixed function of the tokens; ``nan`` poisons every output."""

    def __init__(self, nan: bool, nan_calls: int | None = None) -> None:
        self.config = SimpleNamespace(vocab_size=VOCAB, context_length=64)
        self.nan = nan
        self.nan_calls = nan_calls  # poison only the first N calls (None: every call)

    def _logits(self, ids: np.ndarray) -> np.ndarray:
        out = np.sin(np.arange(VOCAB)[None, :] * (ids[..., None] + 1.0)).astype(np.float32)
        poison = self.nan and (self.nan_calls is None or self.nan_calls > 0)
        if self.nan_calls:
            self.nan_calls -= 1
        return np.full_like(out, np.nan) if poison else out

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


def test_a_nan_in_the_first_chunk_is_not_forgotten_by_later_clean_chunks() -> None:
    windows = np.arange(10 * 64).reshape(10, 64) % VOCAB  # two chunks of text_figures' batch of 8
    figs = text_figures(_Fake(nan=False), _Fake(nan=True, nan_calls=1), windows)
    assert math.isnan(figs["max_abs_diff"])
    assert not _text_rows("text", figs, "onnx", "none")[0]["ok"]
