"""The bench's accuracy column: top-1 agreement and mean KL(torch fp32 || file) on the parity text
(gpts_edge/parity.py's ``text_figures``: full context windows, >= 2,000 positions), measured once
per file and cached, so that size, speed and accuracy are read in one table.

The cache key is the file's bytes, the reference checkpoint's weights, the parity text and
parity.py itself: a changed export, model, text or check is measured afresh.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpts_edge.errors import GptsError
from gpts_edge.fileio import atomic_file, hash_file

# Bump when what is cached changes meaning.
CACHE_VERSION = 1


def cache_key(files: list[Path], reference: Path, extra: str = "") -> str:
    import gpts_edge.parity as parity
    from gpts_edge.checkpoint import weights_sha256

    h = hashlib.sha256(f"v{CACHE_VERSION}|{extra}|{weights_sha256(reference)}".encode())
    for f in sorted(files):
        h.update(f.name.encode())
        hash_file(f, h)
    hash_file(Path(parity.__file__), h)
    hash_file(parity.PARITY_TEXT, h)
    return h.hexdigest()[:24]


def cached(root: Path, key: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``compute()`` once per key; its JSON result is kept under ``root/accuracy``."""
    folder = root / "accuracy"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            pass  # a damaged cache entry is measured again and replaced
    result = compute()
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(result))
    return result


def onnx_parity(runtime: str, folder: Path, ckpt: Path, quant: str, root: Path) -> dict[str, Any]:
    """parity_report's verdict and text figures for an ONNX export (cached by its graph files).
    The bench refuses a graph whose report fails; the accuracy column reuses its text figures."""

    def compute() -> dict[str, Any]:
        from gpts_edge.parity import parity_report

        report = parity_report("onnx", ckpt, quantize=quant)
        return {
            "ok": report["ok"],
            "failed": [r["check"] for r in report["rows"] if not r["ok"]],
            **_figures(report["text"]),
        }

    files = [p for p in folder.iterdir() if p.suffix in (".onnx", ".data")]
    result = cached(root, cache_key(files, ckpt, f"onnx-parity-{quant}"), compute)
    if not result["ok"]:
        raise GptsError(
            f"{runtime}: the graph fails parity ({', '.join(result['failed'])}); refusing to benchmark it"
        )
    return result


def text_accuracy(
    file: Path, reference: Path, open_runtime: Callable[[], Any], root: Path, label: str
) -> dict[str, Any]:
    """top-1 and mean KL of the runtime ``open_runtime()`` against torch fp32 on ``reference``."""

    def compute() -> dict[str, Any]:
        from gpts_edge.parity import text_figures, text_windows
        from gpts_edge.torch_runtime import TorchRuntime

        ref = TorchRuntime(reference)
        windows = text_windows(ref.tokenizer, ref.config.context_length)
        return _figures(text_figures(ref, open_runtime(), windows))

    return cached(root, cache_key([file], reference, label), compute)


def _figures(text: dict[str, Any]) -> dict[str, Any]:
    return {
        "top1_agreement": text["top1_agreement"],
        "mean_kl": text["mean_kl"],
        "positions": text["positions"],
    }
