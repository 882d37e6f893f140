"""Accuracy sweep of ONNX quantization schemes on the bundled model (measurement script, not a test).

    python scripts/quant_sweep.py OUTDIR '{"name": "a", "block": 64, ...}' ...

exports the bundled checkpoint, once per JSON variant, with ``Int4Scheme(**fields)``
(``quantize`` picks the graph path, default int4; lists become tuples) into OUTDIR/NAME (full graph + decode flavour) and prints one JSON line:
bytes, full-window and stepped KL/top-1 against PyTorch fp32 on the parity text, export seconds.
Calibration Hessians are computed once per process and reused; distilled weights come from the
exporter's own cache, so variants that differ only in how they round or run them distil once.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

import gpts_edge.export.onnx as onnx_export
import gpts_edge.export.onnx_calibration as calibration
from gpts_edge.export.onnx_quant import Int4Scheme

_memo: dict[str, object] = {}
_orig = calibration.calibration_hessians


def _memo_hessians(cfg, weights, **kwargs):
    import hashlib

    h = hashlib.sha256()
    for k in sorted(weights):
        h.update(np.ascontiguousarray(weights[k]).tobytes())
    key = h.hexdigest()
    if key not in _memo:
        _memo[key] = _orig(cfg, weights, **kwargs)
    return _memo[key]


def main() -> None:
    out_root, *variants = sys.argv[1:]
    for v in variants:
        kw = {k: tuple(x) if isinstance(x, list) else x for k, x in json.loads(v).items()}
        one(out_root, kw.pop("name"), kw)


def one(out_root: str, name: str, kw: dict) -> None:
    quantize = kw.pop("quantize", "int4")
    steps = kw.pop("steps", True)
    scheme = Int4Scheme(**kw)
    calibration.calibration_hessians = _memo_hessians
    folder = Path(out_root) / name
    t0 = time.perf_counter()
    onnx_export.export_onnx(
        None,
        folder,
        quantize=quantize,
        decode_graph=True,
        force=True,
        scheme=scheme,
        log=lambda m: print(m, file=sys.stderr, flush=True),
    )
    secs = time.perf_counter() - t0
    from gpts_edge.api import open_runtime
    from gpts_edge.parity import text_figures, text_windows
    from gpts_edge.torch_runtime import TorchRuntime

    ref = TorchRuntime(None)
    rt = open_runtime("onnx", folder)
    windows = text_windows(ref.tokenizer, ref.config.context_length)
    full = text_figures(ref, rt, windows)
    row = {
        "name": name,
        "bytes": sum(p.stat().st_size for p in folder.glob("*.onnx")),
        "model_onnx": (folder / "model.onnx").stat().st_size,
        "kl": round(full["mean_kl"], 6),
        "top1": round(full["top1_agreement"] * 100, 2),
        "export_s": round(secs, 1),
    }
    if steps:
        st = text_figures(ref, rt, windows, stepped=True)
        row.update(steps_kl=round(st["mean_kl"], 6), steps_top1=round(st["top1_agreement"] * 100, 2))
    row["scheme"] = {**kw, "quantize": quantize}
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
