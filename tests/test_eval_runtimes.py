"""`gpts-edge eval` scores the same on every runtime: torch vs ONNX fp32 vs GGUF f32 on a tiny
seeded checkpoint. Skips (with the reason) only where an exporter or runtime cannot be imported."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest

from gpts_edge.api import open_runtime
from gpts_edge.evaluate import Item, score_items

ITEMS = [
    Item("Question: Which is hot?\nAnswer:", ("the sun", "ice cream in a freezer", "snow"), 0, "t:1"),
    Item("The cat sat on the", ("mat", "moon and the stars above", "chair"), 2, "t:2"),
    Item(
        "Roof shingle removal: A man is sitting on a roof. He",
        ("is using wrap.", "starts pulling up."),
        1,
        "t:3",
    ),
    Item("1, 2, 3,", ("4", "5, 6, 7, 8, 9"), 0, "t:4"),
    Item(" ".join(f"w{i}" for i in range(60)) + " end", ("of the long context", "x"), 0, "t:5"),  # truncated
]
# float32 logits from different kernels; a choice's sum runs over <= ~10 tokens.
LOGLIK_ATOL = 2e-3


def _need(module: str) -> None:
    try:
        importlib.import_module(module)
    except ImportError as exc:
        pytest.skip(f"{module} not importable yet ({exc})")


@pytest.fixture(scope="module")
def torch_scores(tiny_checkpoint: Path):
    return score_items(open_runtime("torch", tiny_checkpoint), ITEMS, batch_size=2)


@pytest.fixture(scope="module")
def onnx_file(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    _need("gpts_edge.export.onnx")
    _need("gpts_edge.runtimes.onnx")
    from gpts_edge.export.onnx import export_onnx

    return export_onnx(tiny_checkpoint, tmp_path_factory.mktemp("onnx") / "model.onnx", log=lambda _m: None)


@pytest.fixture(scope="module")
def gguf_file(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    _need("gpts_edge.export.gguf")
    _need("gpts_edge.runtimes.gguf")
    from gpts_edge.export.gguf import export_gguf

    return export_gguf(
        tiny_checkpoint, tmp_path_factory.mktemp("gguf") / "tiny.gguf", quant="f32", log=lambda _m: None
    )


def _assert_same_scores(scores, reference) -> None:
    for got, want in zip(scores, reference, strict=True):
        np.testing.assert_allclose(got.loglik, want.loglik, rtol=0, atol=LOGLIK_ATOL)
        assert (got.pred, got.pred_norm, got.pred_bytes) == (want.pred, want.pred_norm, want.pred_bytes)


def test_eval_logliks_identical_torch_vs_onnx_fp32(onnx_file: Path, torch_scores) -> None:
    _assert_same_scores(
        score_items(open_runtime("onnx", onnx_file.parent), ITEMS, batch_size=3), torch_scores
    )


def test_eval_logliks_identical_torch_vs_gguf_f32(gguf_file: Path, torch_scores) -> None:
    _assert_same_scores(score_items(open_runtime("gguf", gguf_file), ITEMS, batch_size=3), torch_scores)
