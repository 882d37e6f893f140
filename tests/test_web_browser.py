"""The browser example in a real headless Chromium: the page's tokens and logits equal the Python
ONNX runtime's, and a user can type a prompt, press Generate and watch text stream in.

Needs Debian's chromium at /usr/bin/chromium, Playwright for Python (`pip install playwright`;
its own browser download is not used) and `npm ci --prefix examples/browser`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from gpts_edge.sampling import SamplingOptions, generate_tokens
from gpts_edge.web import BROWSER_DIR, ORT_SUBDIR, WebServer

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

if not CHROMIUM.is_file():
    pytest.skip(f"{CHROMIUM} not found (apt-get install chromium)", allow_module_level=True)
if not (BROWSER_DIR / ORT_SUBDIR / "ort.wasm.min.mjs").is_file():
    pytest.skip(
        "examples/browser/node_modules missing (npm ci --prefix examples/browser)", allow_module_level=True
    )
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="Playwright for Python missing (pip install playwright)"
)
onnx_runtime = pytest.importorskip("gpts_edge.runtimes.onnx")
export_mod = pytest.importorskip("gpts_edge.export.onnx")

PROMPT = "Once upon a time, a little fox"
LOGITS_TOL = 1e-4


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


def _export(model: Path | None, out: Path) -> Path:
    out.mkdir(parents=True)
    export_mod.export_onnx(model, out / "model.onnx", log=lambda _m: None)
    return out


@pytest.fixture(scope="module")
def tiny_onnx(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(tiny_checkpoint, tmp_path_factory.mktemp("web") / "tiny-onnx")


@pytest.fixture(scope="module")
def bundled_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(None, tmp_path_factory.mktemp("web") / "bundled-onnx")


def _open_page(browser: object, url: str, requested: list[str] | None = None) -> object:
    page = browser.new_page(viewport={"width": 1000, "height": 760})
    errors: list[str] = []
    if requested is not None:
        page.on("request", lambda r: requested.append(r.url))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.wait_for_function("window.gpts !== undefined")
    try:
        page.evaluate("window.gpts.ready.then(() => true)")
    except Exception as exc:
        raise AssertionError(f"page failed to load the model: {page.inner_text('#status')} {errors}") from exc
    return page


def _python_greedy(folder: Path, prompt: str, n: int) -> tuple[list[int], list[int], np.ndarray]:
    rt = onnx_runtime.OnnxRuntime(folder)
    ids = rt.tokenizer.encode(prompt).ids
    first, _ = rt.step(np.asarray(ids[-rt.config.context_length :], dtype=np.int64), rt.new_cache())
    opts = SamplingOptions(
        temperature=0.0,
        top_p=1.0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        max_new_tokens=n,
        stop_at_eos=False,
    )
    tokens = list(
        generate_tokens(
            rt.step,
            rt.new_cache,
            ids,
            opts,
            context_length=rt.config.context_length,
            vocab_size=rt.config.vocab_size,
        )
    )
    return ids, tokens, first


@pytest.mark.parametrize("which", ["tiny", "bundled"])
def test_page_greedy_tokens_and_first_logits_equal_python_onnx_runtime(
    which: str, browser: object, request: pytest.FixtureRequest
) -> None:
    folder = request.getfixturevalue(f"{which}_onnx")
    # The tiny model's context is 64 tokens, so 90 new tokens also cross the sliding window.
    n = 90 if which == "tiny" else 60
    ids, expected, first = _python_greedy(folder, PROMPT, n)
    with WebServer(folder, port=0, log=lambda _m: None) as server:
        page = _open_page(browser, server.url)
        got = page.evaluate("([p, n]) => window.gpts.greedy(p, n)", [PROMPT, n])
        if which == "tiny":  # a prompt longer than the 64-token context keeps its last 64 tokens
            long_prompt = " ".join([PROMPT] * 10)
            long_got = page.evaluate("([p, n]) => window.gpts.greedy(p, n)", [long_prompt, 20])
            assert long_got["stats"]["truncated"] and long_got["stats"]["promptTokens"] == 64
            assert long_got["tokens"] == _python_greedy(folder, long_prompt, 20)[1]
        page.close()
    assert got["promptIds"] == ids
    assert got["tokens"] == expected
    diff = np.abs(np.asarray(got["firstLogits"], dtype=np.float64) - first.astype(np.float64)).max()
    assert diff <= LOGITS_TOL, f"first-step logits differ by {diff:.3g} (bound {LOGITS_TOL})"
    if which == "tiny":
        assert got["stats"]["slid"], "90 tokens after the prompt must slide the 64-token window"


def test_page_samples_like_python_given_the_same_random_draws(browser: object, bundled_onnx: Path) -> None:
    from gpts_edge.generation import sampling_options

    rt = onnx_runtime.OnnxRuntime(bundled_onnx)
    # The model's own defaults: temperature 0.8, top-p 0.95, repetition penalty 1.1, no-repeat-ngram 4.
    opts = sampling_options(rt.generation_config, max_new_tokens=60)
    draws = [float(u) for u in np.random.default_rng(7).random(opts.max_new_tokens)]
    ids = rt.tokenizer.encode(PROMPT).ids
    expected = list(
        generate_tokens(
            rt.step,
            rt.new_cache,
            ids,
            opts,
            context_length=rt.config.context_length,
            vocab_size=rt.config.vocab_size,
            draws=iter(draws),
        )
    )
    with WebServer(bundled_onnx, port=0, log=lambda _m: None) as server:
        # Two WASM threads: the worker scripts load from /ort/ under the COOP/COEP headers.
        page = _open_page(browser, server.url + "?threads=2")
        got = page.evaluate(
            "([p, n, d]) => window.gpts.generate(p, {max_new_tokens: n}, d)",
            [PROMPT, opts.max_new_tokens, draws],
        )
        info = page.inner_text("#info")
        page.close()
    assert "WASM, 2 thread(s), cross-origin isolated" in info
    assert got["tokens"] == expected
    assert len(set(expected)) > 20  # really sampled text, not a loop of one token


def test_user_types_a_prompt_clicks_generate_and_text_streams_in(
    browser: object, bundled_onnx: Path, tmp_path: Path
) -> None:
    from gpts_edge.generation import generate_text, sampling_options

    prompt = "The little robot opened the door and"
    max_new, seed = 48, 3
    rt = onnx_runtime.OnnxRuntime(bundled_onnx)
    # Sampling with the model's defaults (temperature 0.8, top-p 0.95, penalties): the page draws
    # numpy's default_rng(seed) numbers, so it must write what `gpts-edge generate --seed 3` writes.
    opts = sampling_options(rt.generation_config, max_new_tokens=max_new)
    expected = "".join(generate_text(rt, prompt, opts, seed=seed))
    greedy = "".join(
        generate_text(rt, prompt, sampling_options(rt.generation_config, greedy=True, max_new_tokens=max_new))
    )
    assert expected != greedy  # the check below is about sampling, not argmax
    with WebServer(bundled_onnx, port=0, log=lambda _m: None) as server:
        requested: list[str] = []
        page = _open_page(browser, server.url, requested)
        page.fill("#prompt", "")
        page.type("#prompt", prompt)
        page.uncheck("#greedy")
        page.fill("#max_new_tokens", str(max_new))
        page.fill("#seed", str(seed))
        # Count the output's changes: streaming means many small updates, not one at the end.
        page.evaluate(
            "window.__mutations = 0; new MutationObserver(() => window.__mutations++)"
            ".observe(document.querySelector('#output'), {childList: true, subtree: true, characterData: true})"
        )
        page.click("#generate")
        page.wait_for_function("document.querySelector('#status').textContent === 'done'", timeout=60_000)
        output = page.inner_text("#output")
        stats = page.inner_text("#stats")
        mutations = page.evaluate("window.__mutations")
        isolated = page.evaluate("crossOriginIsolated")  # the COOP/COEP headers took effect
        shot = tmp_path / "browser.png"
        page.screenshot(path=str(shot), full_page=True)
        page.close()
    assert output == prompt + expected
    assert isolated, "page is not cross-origin isolated: WASM threads would be unavailable"
    assert mutations >= 10, f"the output changed {mutations} times; expected token-by-token updates"
    # Offline: every request of the page went to the local server (no CDN).
    assert requested and all(u.startswith(server.url) for u in requested), requested
    assert any(u.endswith(".wasm") for u in requested) and any(
        u.endswith("/model/model.onnx") for u in requested
    )
    rates = re.search(r"(\d+\.\d) tokens/s \(model steps alone (\d+\.\d) tokens/s\)", stats)
    assert rates and float(rates[1]) > 0 and float(rates[2]) >= float(rates[1]), stats
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # For the README: GPTS_EDGE_SCREENSHOT=docs/browser.png keeps the picture.
    if os.environ.get("GPTS_EDGE_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["GPTS_EDGE_SCREENSHOT"])


def test_page_reports_a_broken_model_folder_in_one_line(
    browser: object, tiny_onnx: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_onnx, broken)
    cfg = json.loads((broken / "config.json").read_text())
    del cfg["head_dim"]
    (broken / "config.json").write_text(json.dumps(cfg))
    with WebServer(broken, port=0, log=lambda _m: None) as server:
        page = browser.new_page()
        page.goto(server.url)
        page.wait_for_function(
            "document.querySelector('#status').textContent.startsWith('error')", timeout=30_000
        )
        status = page.inner_text("#status")
        disabled = page.is_disabled("#generate")
        page.close()
    assert status == "error: config.json: field head_dim: expected an integer, found undefined"
    assert disabled
