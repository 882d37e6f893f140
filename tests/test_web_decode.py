"""The browser page on a folder with the decode graph: with ?graph=decode the page runs
model.decode.onnx (its weights read from model.onnx through onnxruntime-web's externalData) and its
greedy tokens and first logits equal the Python runtime's; by default it runs model.onnx (the decode
graph measured no faster in WASM, docs/browser.md), with the same tokens.

Same requirements as tests/test_web_browser.py (whose helpers it uses): /usr/bin/chromium,
Playwright for Python, `npm ci --prefix examples/browser`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gpts_edge.config import PRESETS
from gpts_edge.web import WebServer

from . import test_web_browser as web  # skips this module too when the browser setup is missing
from .conftest import make_checkpoint

browser = web.browser  # the module-scoped headless Chromium fixture
LOGITS_TOL, PROMPT, _open_page, _python_greedy = (
    web.LOGITS_TOL,
    web.PROMPT,
    web._open_page,
    web._python_greedy,
)

pytest.importorskip("torch")
export_mod = pytest.importorskip("gpts_edge.export.onnx")

# head_dim 16: GroupQueryAttention's smallest; context 96 so 120 new tokens slide the window.
CFG = PRESETS["tiny"].replace(hidden_size=64, head_dim=16, intermediate_size=128, context_length=96)


@pytest.fixture(scope="module")
def decode_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("web-dec")
    ckpt = make_checkpoint(root / "ckpt", CFG, seed=5)
    export_mod.export_onnx(ckpt, root / "onnx", log=lambda _m: None, decode_graph=True)
    return root / "onnx"


def test_page_runs_the_decode_graph_with_python_tokens_and_logits(
    browser: object, decode_folder: Path
) -> None:
    ids, expected, first = _python_greedy(decode_folder, PROMPT, 120)
    with WebServer(decode_folder, port=0, log=lambda _m: None) as server:
        results = {}
        for graph in ("decode", "full"):
            page = _open_page(browser, server.url + ("?graph=decode" if graph == "decode" else ""))
            name = page.evaluate("window.gpts.ready.then((m) => m.graph)")
            got = page.evaluate("([p, n]) => window.gpts.greedy(p, n)", [PROMPT, 120])
            info = page.inner_text("#info")
            page.close()
            results[graph] = (name, got, info)
    assert results["decode"][0] == "model.decode.onnx" and "model.decode.onnx" in results["decode"][2]
    assert results["full"][0] == "model.onnx"
    for _name, got, _info in results.values():
        assert got["promptIds"] == ids
        assert got["tokens"] == expected
        assert got["stats"]["slid"], "120 tokens after the prompt must slide the 96-token window"
        diff = np.abs(np.asarray(got["firstLogits"], dtype=np.float64) - first.astype(np.float64)).max()
        assert diff <= LOGITS_TOL, f"first-step logits differ by {diff:.3g} (bound {LOGITS_TOL})"
    assert float(np.std(first)) > 1e-3  # real, varied logits
