"""`gpts-edge web`: serve the browser example, a model folder and onnxruntime-web, all locally.

URL layout (the page in examples/browser/ expects it):
  /               examples/browser/ (index.html, the JS modules)
  /ort/           examples/browser/node_modules/onnxruntime-web/dist/
  /model/         the exported ONNX folder: model.onnx, model.decode.onnx (when usable),
                  config.json, tokenizer.json, generation_config.json

Every response carries the COOP/COEP headers that make the page cross-origin isolated, which
WASM threads (SharedArrayBuffer) need. Nothing is fetched from the internet.
"""

from __future__ import annotations

import mimetypes
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from gpts_edge.constants import DECODE_SUFFIX, ONNX_MODEL_FILE, flavour_file
from gpts_edge.errors import GptsError

REPO_ROOT = Path(__file__).resolve().parent.parent
BROWSER_DIR = REPO_ROOT / "examples" / "browser"
ORT_SUBDIR = Path("node_modules") / "onnxruntime-web" / "dist"
INSTALL_HINT = "npm ci --prefix examples/browser"
MODEL_SIDECARS = ("config.json", "tokenizer.json", "generation_config.json")
# Served when the folder has a usable one; the page runs it with ?graph=decode (default: model.onnx).
DECODE_FILE = flavour_file(ONNX_MODEL_FILE, DECODE_SUFFIX)

ISOLATION_HEADERS = {
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
    "Cross-Origin-Resource-Policy": "same-origin",
}
TYPES = {
    ".mjs": "text/javascript",
    ".js": "text/javascript",
    ".wasm": "application/wasm",
    ".json": "application/json",
    ".onnx": "application/octet-stream",
    ".css": "text/css",
    ".html": "text/html; charset=utf-8",
    ".map": "application/json",
    ".png": "image/png",
}


def browser_dir(root: Path | None = None) -> Path:
    """The page's folder with its npm dependencies installed, or a GptsError saying how to get there."""
    page = Path(root) if root is not None else BROWSER_DIR
    if not (page / "index.html").is_file():
        raise GptsError(
            f"{page}: the browser example is missing. `gpts-edge web` serves examples/browser/ from a "
            "source checkout of gpts-edge (a wheel install does not include examples/): clone the "
            f"repository, run `{INSTALL_HINT}` there, then `gpts-edge web`"
        )
    ort_dist = page / ORT_SUBDIR
    if not (ort_dist / "ort.wasm.min.mjs").is_file():
        raise GptsError(
            f"{ort_dist}: onnxruntime-web is not installed; run `{INSTALL_HINT}` in the repository root "
            "(needs Node.js and npm; installs the versions pinned in examples/browser/package-lock.json)"
        )
    return page


def resolve_model(model: str | Path | None, log: Callable[[str], None] = print) -> tuple[Path, Path]:
    """(model.onnx file, folder with its sidecar files) for an exported ONNX folder or .onnx file;
    a checkpoint directory or None (the bundled model) is exported once into the user cache."""
    from gpts_edge.api import resolve_onnx

    onnx_file = resolve_onnx(model, log)
    if onnx_file.suffix != ".onnx":
        raise GptsError(f"--model {model}: the page runs a .onnx graph, found {onnx_file.name}")
    folder = onnx_file.parent
    missing = [name for name in MODEL_SIDECARS[:2] if not (folder / name).is_file()]
    if missing:
        raise GptsError(
            f"{folder}: missing {', '.join(missing)} beside {onnx_file.name} "
            "(export with `gpts-edge export --format onnx` to get them)"
        )
    return onnx_file, folder


def decode_graph_for_page(onnx_file: Path) -> Path | None:
    """The decode flavour beside ``onnx_file`` when the page can run it: present, exported with
    this very model file (the runtime's stale check), and reading its weights from a file the page
    knows as model.onnx (or from none). Otherwise the page runs the full graph."""
    from gpts_edge.names import ONNX_META_WEIGHTS_FILE
    from gpts_edge.runtimes.onnx import flavour_path, onnx_metadata, stale_flavour

    decode = flavour_path(onnx_file, DECODE_SUFFIX)
    if not decode.is_file() or stale_flavour(decode) is not None:
        return None
    source = onnx_metadata(decode).get(ONNX_META_WEIGHTS_FILE)
    # The page serves the graph as model.onnx, so a flavour reading its weights from a file must
    # read them from that one, under that name.
    if source is not None and not source == onnx_file.name == ONNX_MODEL_FILE:
        return None
    return decode


class _Handler(BaseHTTPRequestHandler):
    server_version = "gpts-edge-web"
    routes: dict[str, Path]
    model_files: dict[str, Path]
    quiet = True

    def log_message(self, format: str, *args: object) -> None:
        if not self.quiet:
            super().log_message(format, *args)

    def _target(self) -> Path | None:
        path = unquote(urlsplit(self.path).path)
        if path == "/":
            path = "/index.html"
        if path.startswith("/model/"):
            return self.model_files.get(path.removeprefix("/model/"))
        for prefix, root in self.routes.items():
            if path.startswith(prefix):
                candidate = (root / path.removeprefix(prefix)).resolve()
                if not candidate.is_relative_to(root):  # a ../ escape
                    return None
                parts = candidate.relative_to(root).parts
                # No dotfiles, and npm packages only through /ort/.
                if any(part.startswith(".") for part in parts) or (
                    prefix == "/" and parts[:1] == ("node_modules",)
                ):
                    return None
                return candidate
        return None

    def _send(self, head_only: bool) -> None:
        if "\x00" in unquote(urlsplit(self.path).path):
            # No file name holds a NUL; pathlib would raise on it and drop the connection.
            self.send_error(400, "bad request")
            return
        target = self._target()
        if target is None or not target.is_file():
            self.send_error(404, "not found")
            return
        data = target.read_bytes()
        self.send_response(200)
        ctype = TYPES.get(target.suffix) or mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-cache")
        for key, value in ISOLATION_HEADERS.items():
            self.send_header(key, value)
        self.end_headers()
        if not head_only:
            self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._send(head_only=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._send(head_only=True)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # Error pages are resources too: without the headers COEP would mask the real status.
        self._extra = ISOLATION_HEADERS
        super().send_error(code, message, explain)

    def end_headers(self) -> None:
        extra = getattr(self, "_extra", None)
        if extra:
            for key, value in extra.items():
                self.send_header(key, value)
            self._extra = None
        super().end_headers()


class WebServer:
    """The page server; ``start()`` runs it on a background thread (for tests), ``serve_forever()``
    in the foreground (the CLI)."""

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 8000,
        page_dir: Path | None = None,
        log: Callable[[str], None] = print,
        quiet: bool = True,
    ) -> None:
        if not 0 <= port <= 65535:
            raise GptsError(f"--port: expected 0..65535 (0: any free port), found {port}")
        page = browser_dir(page_dir).resolve()
        self.onnx_file, self.model_dir = resolve_model(model, log=log)
        model_files = {ONNX_MODEL_FILE: self.onnx_file.resolve()}
        decode = decode_graph_for_page(self.onnx_file)
        if decode is not None:
            model_files[DECODE_FILE] = decode.resolve()
        for name in MODEL_SIDECARS:
            if (self.model_dir / name).is_file():
                model_files[name] = (self.model_dir / name).resolve()
        handler = type(
            "Handler",
            (_Handler,),
            {
                "routes": {"/ort/": (page / ORT_SUBDIR).resolve(), "/": page},
                "model_files": model_files,
                "quiet": quiet,
            },
        )
        try:
            self.httpd = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            raise GptsError(
                f"--port {port}: cannot listen on {host}:{port} ({exc.strerror or exc})"
            ) from None
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/"

    def start(self) -> WebServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        try:
            self.httpd.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            self.httpd.server_close()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread:
            self._thread.join(timeout=5)

    def __enter__(self) -> WebServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve(
    model: str | Path | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    log: Callable[[str], None] = print,
) -> None:
    """Serve until Ctrl-C."""
    server = WebServer(model, host=host, port=port, log=log, quiet=False)
    log(f"serving {server.onnx_file} and the browser example at {server.url} (Ctrl-C to stop)")
    server.serve_forever()
