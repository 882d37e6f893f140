"""How well a model predicts a text file: mean NLL, perplexity and bits per byte, through any
runtime's ``forward_logits``.

The file's tokens are scored after ``<|endoftext|>`` (so the first token is predicted too) in
windows of the model's context. With ``stride`` = context (the default) the windows do not
overlap and each token is predicted from its own window only; a smaller stride slides the
window by ``stride`` tokens and scores only the tokens not scored yet, each with at least
``context - stride`` tokens before it (the transformers perplexity guide's scheme).

Bits per byte = total NLL / ln 2 / UTF-8 bytes of the text: comparable across tokenizers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gpts_edge.errors import GptsError
from gpts_edge.tokenizer import EOT_ID

WINDOWS_PER_CALL = 8  # windows per forward_logits call: 8 x 384 x 4096 fp32 logits = 50 MB


@dataclass
class Score:
    tokens: int
    bytes: int
    nll: float  # total, nats

    @property
    def mean_nll(self) -> float:
        return self.nll / self.tokens

    def as_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "bytes": self.bytes,
            "nll": self.mean_nll,
            "perplexity": math.exp(self.mean_nll),
            "bits_per_byte": self.nll / math.log(2) / self.bytes,
        }


def read_text(path: str | Path) -> str:
    """A file's text, or one clear error for a missing, empty, binary or non-UTF-8 file."""
    p = Path(path)
    if not p.is_file():
        raise GptsError(f"{p}: no such file")
    data = p.read_bytes()
    if not data:
        raise GptsError(f"{p}: the file is empty (nothing to score)")
    nul = data.find(b"\x00")
    if nul >= 0:
        raise GptsError(f"{p}: looks binary (NUL byte at offset {nul}); expected UTF-8 text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise GptsError(f"{p}: not UTF-8 text (invalid byte at offset {exc.start})") from None


def windows(n_targets: int, context: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """Over the sequence [EOT, t1..tn]: (begin, end, first) per window, where the input is
    positions begin..end-1, its logits predict positions begin+1..end, and the targets scored are
    positions first..end (each exactly once over all windows)."""
    if not 1 <= stride <= context:
        raise GptsError(f"--stride: expected 1..{context} (the model's context), found {stride}")
    scored = 0
    begin = 0
    while scored < n_targets:
        end = min(begin + context, n_targets)
        yield begin, end, scored + 1
        scored = end
        begin += stride


def score_ids(
    runtime: Any,
    ids: list[int],
    stride: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> float:
    """Total NLL (nats) of ``ids`` after ``<|endoftext|>`` under ``runtime.forward_logits``."""
    context = runtime.config.context_length
    seq = np.asarray([EOT_ID, *ids], dtype=np.int64)
    plan = list(windows(len(ids), context, context if stride is None else stride))
    total = 0.0
    done = 0
    # Windows of the same length go through one forward call together.
    for length in sorted({e - b for b, e, _ in plan}, reverse=True):
        group = [w for w in plan if w[1] - w[0] == length]
        for k in range(0, len(group), WINDOWS_PER_CALL):
            chunk = group[k : k + WINDOWS_PER_CALL]
            x = np.stack([seq[b:e] for b, e, _ in chunk])
            logits = np.asarray(runtime.forward_logits(x), dtype=np.float64)
            logp = logits - _logsumexp(logits)
            for row, (b, e, first) in enumerate(chunk):
                pos = np.arange(first, e + 1)  # target positions in seq
                total -= float(logp[row, pos - 1 - b, seq[pos]].sum())
                done += len(pos)
            if progress is not None:
                progress(done, len(ids))
    return total


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    return m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def score_file(
    runtime: Any,
    path: str | Path,
    stride: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Score:
    text = read_text(path)
    ids = runtime.tokenizer.encode(text).ids
    if not ids:
        raise GptsError(f"{path}: the text gives no tokens")
    return Score(len(ids), len(text.encode("utf-8")), score_ids(runtime, ids, stride, progress))


def perplexity_report(
    runtime: Any,
    files: list[str],
    stride: int | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """{"files": {path: scores}, "total": scores}; ``log`` gets progress lines for long files."""
    if not files:
        raise GptsError("give at least one FILE to score")
    context = runtime.config.context_length
    if stride is not None and not 1 <= stride <= context:
        raise GptsError(f"--stride: expected 1..{context} (the model's context), found {stride}")
    for f in files:  # every file checked before any is scored
        read_text(f)
    scores = {}
    for f in files:
        last = [0.0]

        def progress(done: int, total: int, f: str = f, last: list[float] = last) -> None:
            if (
                log is not None
                and total > 4 * runtime.config.context_length
                and done / total - last[0] >= 0.1
            ):
                last[0] = done / total
                log(f"{f}: {done:,}/{total:,} tokens scored")

        scores[f] = score_file(runtime, f, stride, progress)
    total = Score(
        sum(s.tokens for s in scores.values()),
        sum(s.bytes for s in scores.values()),
        sum(s.nll for s in scores.values()),
    )
    return {"files": {f: s.as_dict() for f, s in scores.items()}, "total": total.as_dict()}


def format_report(report: dict[str, Any]) -> str:
    rows = [("file", "tokens", "bytes", "nll", "perplexity", "bits/byte")]
    items = list(report["files"].items())
    if len(items) > 1:
        items.append(("total", report["total"]))
    for name, s in items:
        rows.append(
            (
                name,
                f"{s['tokens']:,}",
                f"{s['bytes']:,}",
                f"{s['nll']:.4f}",
                f"{s['perplexity']:.2f}",
                f"{s['bits_per_byte']:.4f}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    )
