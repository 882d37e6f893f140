"""`gpts-edge serve`: an OpenAI-compatible completions server on Starlette + uvicorn.

    GET  /health                 liveness and the scheduler's load (no API key needed)
    GET  /v1/models              the one model: id and context length
    POST /v1/completions         prompt(s) -> text, or server-sent events with "stream": true
    POST /v1/chat/completions    400: the model has no chat template

This module is only HTTP: auth, body limits, error bodies, logging, SSE framing. Validation and
text handling are gpts_edge.completions; decoding is gpts_edge.batching's scheduler.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from gpts_edge.completions import (
    DEFAULT_MODEL_ID,
    MAX_BODY_BYTES,
    TRUNCATED_HEADER,
    ApiError,
    Choice,
    CompletionRequest,
    Server,
    _Channel,
    completion_body,
    parse_completion,
)
from gpts_edge.engines import EngineProcesses, usable_cores
from gpts_edge.errors import GptsError

API_KEY_ENV = "GPTS_EDGE_API_KEY"


def _require_stack() -> None:
    missing = []
    for name in ("starlette", "uvicorn"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise GptsError(
            f"gpts-edge serve needs the 'serve' extra ({', '.join(missing)} missing): "
            "pip install 'gpts-edge[serve]'"
        )


async def _read_json(request: Any) -> Any:
    size = request.headers.get("content-length", "")
    if size.isdigit() and int(size) > MAX_BODY_BYTES:
        raise ApiError(
            413, f"body: {size} bytes is over the limit of {MAX_BODY_BYTES}", code="body_too_large"
        )
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_BODY_BYTES:
            raise ApiError(413, f"body: over the limit of {MAX_BODY_BYTES} bytes", code="body_too_large")
    try:
        return json.loads(bytes(data))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"body: not valid JSON ({str(exc)[:80]})", code="invalid_json") from None


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _chunk_logprobs(choice: Choice, sent: dict[int, int]) -> dict[str, Any] | None:
    """The logprob entries of ``choice`` not yet streamed."""
    if not choice.want_logprobs:
        return None
    start, end = sent.get(choice.index, 0), len(choice.offsets)
    sent[choice.index] = end
    out = {k: v[start:end] for k, v in choice.lp.items()}
    out["text_offset"] = choice.offsets[start:end]
    return out


def create_app(server: Server) -> Any:
    """The Starlette app over a Server (its scheduler already running)."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    def error_response(exc: ApiError) -> JSONResponse:
        headers = {"www-authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    async def on_api_error(_request: Request, exc: Exception) -> JSONResponse:
        return error_response(exc)  # type: ignore[arg-type]

    async def on_http_error(_request: Request, exc: Exception) -> JSONResponse:
        status = getattr(exc, "status_code", 500)
        detail = getattr(exc, "detail", "") or "error"
        return error_response(ApiError(status, str(detail), code="not_found" if status == 404 else None))

    async def on_bug(_request: Request, exc: Exception) -> JSONResponse:
        return error_response(ApiError(500, f"internal error: {type(exc).__name__}", code="internal_error"))

    async def health(_request: Request) -> JSONResponse:
        load = server.scheduler.load()
        if load.get("engines_alive", 1):
            return JSONResponse({"status": "ok", **load})
        return JSONResponse({"status": "error", **load}, status_code=503)  # nothing left to decode

    async def models(_request: Request) -> JSONResponse:
        return JSONResponse(server.models())

    async def model(request: Request) -> JSONResponse:
        if request.path_params["model"] != server.model_id:
            raise ApiError(404, f"model {request.path_params['model']!r} not found", code="model_not_found")
        return JSONResponse(server.models()["data"][0])

    async def chat(request: Request) -> JSONResponse:
        await _read_json(request)
        raise ApiError(
            400,
            f"{server.model_id} is a base model with no chat template; use /v1/completions with a text prompt",
            param="messages",
            code="chat_template_missing",
        )

    async def completions(request: Request) -> Any:
        req = parse_completion(await _read_json(request), server.model_id)
        scores = server.score_prompts(req)
        scored = await asyncio.wrap_future(scores) if scores is not None else None
        channel = _Channel(asyncio.get_running_loop(), server.hub)
        choices, seqs, info = server.start(req, channel, scored)
        headers = {TRUNCATED_HEADER: ",".join(info["truncated"])} if info["truncated"] else {}
        rid = f"cmpl-{secrets.token_hex(12)}"
        counter = request.scope["gpts.tokens"]
        if not req.stream:

            async def collect() -> None:
                async for _ in server.run(choices, seqs, channel):
                    counter[0] = sum(c.tokens for c in choices)

            # A client that leaves before its answer stops its generation, as a streaming one does
            # (run's cleanup cancels the sequences): its row goes to the next request.
            if not await _unless_disconnected(request, collect()):
                return Response(status_code=CLIENT_GONE)
            return JSONResponse(completion_body(server, rid, choices, info), headers=headers)
        return StreamingResponse(
            _events(server, req, rid, choices, seqs, channel, info, counter),
            media_type="text/event-stream",
            headers={**headers, "cache-control": "no-cache"},
        )

    routes = [
        Route("/health", health),
        Route("/v1/models", models),
        Route("/v1/models/{model:path}", model),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={ApiError: on_api_error, HTTPException: on_http_error, Exception: on_bug},
    )
    return _Gate(app, server, error_response)


# nginx's "client closed request": only ever in the log, since nobody is left to read it.
CLIENT_GONE = 499


async def _unless_disconnected(request: Any, work: Any) -> bool:
    """Run the coroutine ``work`` until it ends (True) or the client disconnects first (False,
    ``work`` cancelled). The body has been read, so the next ASGI message is the disconnect."""

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if task.done():
        task.result()  # its errors (an ApiError) become the response
        return True
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return False


async def _events(
    server: Server,
    req: CompletionRequest,
    rid: str,
    choices: list[Choice],
    seqs: list,
    channel: _Channel,
    info: dict,
    counter: list[int],
) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(choice: Choice, text: str, finish: str | None, logprobs: Any) -> str:
        return _sse(
            {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": server.model_id,
                "choices": [
                    {"index": choice.index, "text": text, "logprobs": logprobs, "finish_reason": finish}
                ],
            }
        )

    sent: dict[int, int] = {}
    try:
        if req.echo:
            for c in choices:
                yield chunk(c, c.prefix, None, _chunk_logprobs(c, sent))
        async for batch in server.run(choices, seqs, channel):
            for choice, piece, finished in batch:
                if piece or finished:
                    yield chunk(
                        choice, piece, choice.finish if finished else None, _chunk_logprobs(choice, sent)
                    )
            counter[0] = sum(c.tokens for c in choices)
        if req.include_usage:
            completion = sum(c.tokens for c in choices)
            usage = {
                "prompt_tokens": info["prompt_tokens"],
                "completion_tokens": completion,
                "total_tokens": info["prompt_tokens"] + completion,
            }
            yield _sse(
                {
                    "id": rid,
                    "object": "text_completion",
                    "created": created,
                    "model": server.model_id,
                    "choices": [],
                    "usage": usage,
                }
            )
    except ApiError as exc:  # the status line is already sent: the error goes in the stream
        yield _sse(exc.body())
    yield "data: [DONE]\n\n"


class _Gate:
    """ASGI middleware: API key on /v1/*, and one log line per request (after its last byte)."""

    def __init__(self, app: Any, server: Server, error_response: Callable[[ApiError], Any]) -> None:
        self.app, self.server, self.error_response = app, server, error_response

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]
        scope["gpts.tokens"] = [0]

        async def send_logged(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            key = self.server.api_key
            if key and scope["path"].startswith("/v1"):
                auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
                if not secrets.compare_digest(auth.encode(), f"Bearer {key}".encode()):
                    err = ApiError(
                        401, "missing or wrong API key (Authorization: Bearer KEY)", code="invalid_api_key"
                    )
                    await self.error_response(err)(scope, receive, send_logged)
                    return
            await self.app(scope, receive, send_logged)
        finally:
            ms = (time.perf_counter() - start) * 1000
            self.server.log_request(scope["method"], scope["path"], status[0], scope["gpts.tokens"][0], ms)


def default_model_id(model: str | Path | None) -> str:
    if model is None:
        return DEFAULT_MODEL_ID
    p = Path(model)
    return (p.stem if p.is_file() else p.resolve().name) or DEFAULT_MODEL_ID


def open_server(
    model: str | None = None,
    *,
    runtime: str | None = None,
    parallel: int = 16,
    max_queue: int = 64,
    threads: int = 0,
    api_key: str | None = None,
    json_logs: bool = False,
    in_process: bool = False,
    log: Callable[[str], None] | None = None,
) -> Server:
    """Open the model and start its decoding (no socket yet): ``threads`` engine processes when
    the model batches (``in_process``: scheduler threads in this process instead); 0, the
    default, is one per usable core (and at most one per row of ``parallel``)."""
    from gpts_edge.api import open_runtime

    if threads < 0:
        raise GptsError(f"--threads: expected 0 (every core) or a positive integer, found {threads}")
    threads = threads or usable_cores()
    rt = open_runtime(runtime, model, threads=threads)
    return Server(
        rt,
        model_id=default_model_id(model),
        parallel=parallel,
        max_queue=max_queue,
        threads=threads,
        processes=not in_process,
        api_key=api_key or os.environ.get(API_KEY_ENV) or None,
        json_logs=json_logs,
        log=log,
    )


def serve(
    model: str | None = None,
    *,
    runtime: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8080,
    parallel: int = 16,
    max_queue: int = 64,
    threads: int = 0,
    api_key: str | None = None,
    json_logs: bool = False,
    in_process: bool = False,
    log: Callable[[str], None] = print,
) -> None:
    """Open the model and serve until interrupted."""
    _require_stack()
    import uvicorn

    if not 0 <= port <= 65535:
        raise GptsError(f"--port: expected 0..65535, found {port}")
    server = open_server(
        model,
        runtime=runtime,
        parallel=parallel,
        max_queue=max_queue,
        threads=threads,
        api_key=api_key,
        json_logs=json_logs,
        in_process=in_process,
    )
    mode = "batched decode graph" if server.scheduler.batched else "one step per sequence"
    if server.scheduler.batched:
        # What runs, not what was asked: Windows keeps threads whatever the flag says.
        n = server.scheduler.engines
        if isinstance(server.scheduler, EngineProcesses):
            mode += f" in {n} engine process{'es' if n > 1 else ''}"
        else:
            mode += f" on {n} scheduler thread{'s' if n > 1 else ''}"
    kind = type(server.runtime).__name__
    log(
        f"serving {server.model_id} ({kind}, {mode}, --parallel {parallel}) on http://{host}:{port}/v1"
        + (" with an API key" if server.api_key else "")
    )
    try:
        uvicorn.run(create_app(server), host=host, port=port, log_level="warning", access_log=False)
    finally:
        server.close()
