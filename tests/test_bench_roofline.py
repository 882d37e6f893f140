"""The roofline note's two tools: scripts/membw.py measures bandwidth, scripts/roofline.py counts
the bytes one decode step reads from the files the bench runs."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


def _script(name: str):  # noqa: ANN202
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_membw_reports_read_and_copy_bandwidth_for_one_core_and_every_core() -> None:
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "membw.py"),
            "--sizes-mib",
            "0.25",
            "--repeat",
            "2",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    row = out["sizes"]["0.25 MiB"]
    assert set(row) == {"1 core", f"{out['cores']} cores"}
    for figures in row.values():
        assert figures["read"] > 0.1 and figures["copy"] > 0.1  # GB/s; any real machine exceeds this


def test_an_fp32_decode_step_reads_every_weight_once_plus_one_embedding_row(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("torch")
    from gpts_edge.checkpoint import load_checkpoint
    from gpts_edge.export.onnx import export_onnx
    from tests.test_onnx_decode import peaky16

    ckpt = peaky16(tmp_path / "peaky16")
    (tmp_path / "out").mkdir()
    folder = export_onnx(ckpt, tmp_path / "out" / "model.onnx", log=lambda _m: None, decode_graph=True).parent
    cfg = load_checkpoint(ckpt).config
    n_params = sum(w.size for w in load_checkpoint(ckpt).weights.values())
    got = _script("roofline").onnx_step_bytes(folder / "model.decode.onnx")
    # The tied head reads the whole embedding; the input Gather one row; a few int64 constants.
    want = 4 * (n_params + cfg.hidden_size)
    assert want <= got <= want + 512
