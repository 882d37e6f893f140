"""`gpts-edge web`: what it serves, with which headers, and how it fails. No browser needed."""

from __future__ import annotations

import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from gpts_edge.errors import GptsError
from gpts_edge.web import BROWSER_DIR, ORT_SUBDIR, WebServer, browser_dir, resolve_model

from .conftest import run_cli

ISOLATION = {"cross-origin-opener-policy": "same-origin", "cross-origin-embedder-policy": "require-corp"}


@pytest.fixture()
def page_dir(tmp_path: Path) -> Path:
    """A stand-in for examples/browser with onnxruntime-web 'installed'."""
    page = tmp_path / "page"
    (page / ORT_SUBDIR).mkdir(parents=True)
    (page / "index.html").write_text("<!doctype html><title>t</title>")
    (page / "app.js").write_text("export {};")
    (page / ".secret").write_text("no")
    (page / ORT_SUBDIR / "ort.wasm.min.mjs").write_text("export {};")
    (page / ORT_SUBDIR / "ort-wasm-simd-threaded.wasm").write_bytes(b"\0asm\1\0\0\0")
    (page / "node_modules" / "other.js").write_text("no")
    return page


@pytest.fixture()
def model_dir(tmp_path: Path, tokenizer_json: Path) -> Path:
    folder = tmp_path / "exported"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"onnx-bytes-stand-in")
    (folder / "config.json").write_text("{}")
    (folder / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
    return folder


def _get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as res:
            return res.status, {k.lower(): v for k, v in res.headers.items()}, res.read()
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}, b""


def test_web_serves_page_model_and_ort_with_isolation_headers(page_dir: Path, model_dir: Path) -> None:
    with WebServer(model_dir, port=0, page_dir=page_dir, log=lambda _m: None) as server:
        cases = {
            "": ("text/html; charset=utf-8", (page_dir / "index.html").read_bytes()),
            "app.js": ("text/javascript", b"export {};"),
            "ort/ort.wasm.min.mjs": ("text/javascript", b"export {};"),
            "ort/ort-wasm-simd-threaded.wasm": ("application/wasm", b"\0asm\1\0\0\0"),
            "model/model.onnx": ("application/octet-stream", b"onnx-bytes-stand-in"),
            "model/tokenizer.json": ("application/json", (model_dir / "tokenizer.json").read_bytes()),
        }
        for path, (ctype, body) in cases.items():
            status, headers, data = _get(server.url + path)
            assert (status, headers["content-type"], data) == (200, ctype, body), path
            assert {k: headers[k] for k in ISOLATION} == ISOLATION, path
        # generation_config.json is optional and absent here.
        assert _get(server.url + "model/generation_config.json")[0] == 404


@pytest.mark.parametrize(
    "path",
    [
        "../../etc/passwd",
        "%2e%2e/%2e%2e/etc/passwd",
        ".secret",
        "node_modules/other.js",
        "model/../config.json",
        "model/secret.txt",
        "ort/../../index.html",
    ],
)
def test_web_refuses_paths_outside_what_it_serves(page_dir: Path, model_dir: Path, path: str) -> None:
    with WebServer(model_dir, port=0, page_dir=page_dir, log=lambda _m: None) as server:
        status, headers, _ = _get(server.url + path)
    assert status == 404
    assert headers["cross-origin-embedder-policy"] == "require-corp"


def test_web_without_node_modules_names_the_npm_command(page_dir: Path) -> None:
    import shutil

    shutil.rmtree(page_dir / "node_modules")
    with pytest.raises(
        GptsError, match=r"onnxruntime-web is not installed; run `npm ci --prefix examples/browser`"
    ):
        browser_dir(page_dir)


def test_web_without_examples_folder_explains_wheel_installs(tmp_path: Path) -> None:
    with pytest.raises(GptsError, match=r"a wheel install does not include examples/"):
        browser_dir(tmp_path / "examples" / "browser")


def test_web_model_errors_are_one_clear_line(tmp_path: Path, model_dir: Path) -> None:
    with pytest.raises(GptsError, match="no such file or folder"):
        resolve_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GptsError, match=r"expected a checkpoint folder .* or an exported ONNX folder"):
        resolve_model(tmp_path / "empty")
    (model_dir / "tokenizer.json").unlink()
    with pytest.raises(GptsError, match="missing tokenizer.json beside model.onnx"):
        resolve_model(model_dir)
    with pytest.raises(GptsError, match=r"expected a checkpoint folder, an ONNX folder, a \.onnx/\.ort file"):
        resolve_model(model_dir / "config.json")


def test_web_port_in_use_is_a_clear_error(page_dir: Path, model_dir: Path) -> None:
    with WebServer(model_dir, port=0, page_dir=page_dir, log=lambda _m: None) as first:
        port = first.httpd.server_address[1]
        with pytest.raises(GptsError, match=f"--port {port}: cannot listen"):
            WebServer(model_dir, port=port, page_dir=page_dir, log=lambda _m: None)


def test_web_checkpoint_folder_is_exported_once_into_the_cache(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("onnx")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    onnx_file, folder = resolve_model(tiny_checkpoint, log=lambda _m: None)
    assert onnx_file.is_file() and folder == onnx_file.parent
    assert folder.is_relative_to(tmp_path / "cache")
    assert {"config.json", "tokenizer.json", "generation_config.json"} <= {p.name for p in folder.iterdir()}
    mtime = onnx_file.stat().st_mtime_ns
    assert resolve_model(tiny_checkpoint, log=lambda _m: None)[0].stat().st_mtime_ns == mtime


def test_web_cli_bad_model_exits_2_with_one_line(tmp_path: Path) -> None:
    proc = run_cli("web", "--model", str(tmp_path / "nope"), "--port", "0", timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(
    not (BROWSER_DIR / ORT_SUBDIR / "ort.wasm.min.mjs").is_file(),
    reason="examples/browser/node_modules missing (npm ci --prefix examples/browser)",
)
def test_web_cli_serves_the_page_until_stopped(model_dir: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpts_edge.cli", "web", "--model", str(model_dir), "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stderr.readline()
        assert " at http://127.0.0.1:" in line, line
        url = line.split(" at ")[1].split()[0]
        status, headers, body = _get(url)
        assert status == 200 and b'src="app.js"' in body
        assert headers["cross-origin-opener-policy"] == "same-origin"
        assert _get(url + "ort/ort.wasm.min.mjs")[0] == 200
    finally:
        proc.terminate()
        proc.wait(timeout=10)
