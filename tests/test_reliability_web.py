"""`gpts-edge web` answers malformed paths with 400 and keeps serving."""

from __future__ import annotations

import http.client
from pathlib import Path

import pytest

from gpts_edge.web import ORT_SUBDIR, WebServer


@pytest.fixture()
def server(tmp_path: Path, tokenizer_json: Path):
    page = tmp_path / "page"
    (page / ORT_SUBDIR).mkdir(parents=True)
    (page / "index.html").write_text("<!doctype html><title>t</title>")
    (page / ORT_SUBDIR / "ort.wasm.min.mjs").write_text("export {};")
    model = tmp_path / "exported"
    model.mkdir()
    (model / "model.onnx").write_bytes(b"onnx-bytes-stand-in")
    (model / "config.json").write_text("{}")
    (model / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
    with WebServer(model, port=0, page_dir=page, log=lambda _m: None) as s:
        yield s


def _status(server: WebServer, path: str) -> int:
    host, port = server.httpd.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


@pytest.mark.parametrize("path", ["/%00", "/index.html%00.js", "/ort/%00", "/model/%00"])
def test_a_nul_in_the_path_is_a_400_not_a_dropped_connection(server: WebServer, path: str) -> None:
    assert _status(server, path) == 400
    assert _status(server, "/") == 200  # still serving
