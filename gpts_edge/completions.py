"""OpenAI completions without HTTP: request validation, per-choice text (stop strings, logprobs),
and the bridge from the batch scheduler's thread to the event loop. gpts_edge.serve puts it on
Starlette; decoding is gpts_edge.batching's scheduler (one thread owns the model, requests join and
leave its batch between steps).

Sampling is the project's one sampler with the model's generation_config.json defaults, so
`temperature: 0` gives the text of `gpts-edge generate --greedy` and `seed: N` the text of
`gpts-edge generate --seed N`. Choice j of a request with `seed: N` uses seed N + j.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import numbers
import secrets
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from gpts_edge.batching import MAX_LOGPROBS, QueueFull, Sequence, TokenEvent
from gpts_edge.engines import open_scheduler
from gpts_edge.errors import GptsError
from gpts_edge.generation import Runtime, sampling_options
from gpts_edge.sampling import SequenceSampler
from gpts_edge.tokenizer import EOT_ID, StreamDecoder

MAX_BODY_BYTES = 1 << 20
MAX_N = 4
MAX_STOPS = 4
MAX_TOKENS_LIMIT = 16384  # generation slides past the context, so only a sanity bound
DEFAULT_MODEL_ID = "gpt-s-1.4m"
TRUNCATED_HEADER = "x-prompt-truncated"  # "<tokens given>/<tokens kept>" on every choice's prompt
UNSUPPORTED = {  # OpenAI fields this server does not implement, with the value that means "off"
    "best_of": (None, 1),
    "suffix": (None, ""),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "min_p": (None, 0, 0.0),
}


class ApiError(Exception):
    """An error response in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None, kind: str = ""
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or {
            401: "authentication_error",
            404: "not_found_error",
            429: "rate_limit_error",
        }.get(status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# --- request fields ----------------------------------------------------------------------------------


@dataclass
class CompletionRequest:
    prompts: list[str]
    sampling: dict[str, Any]  # overrides for sampling_options (None: the model's default)
    seed: int | None
    n: int
    stop: list[str]
    stream: bool
    include_usage: bool
    logprobs: int | None
    echo: bool


def _bad(param: str, expected: str, found: Any) -> ApiError:
    shown = json.dumps(found)[:80] if not isinstance(found, float) else repr(found)
    return ApiError(400, f"{param}: expected {expected}, found {shown}", param=param, code="invalid_value")


def _number(body: dict, key: str, *, integer: bool = False) -> Any:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _bad(key, "an integer" if integer else "a number", value)
    if integer and (not isinstance(value, int) and not float(value).is_integer()):
        raise _bad(key, "an integer", value)
    if not math.isfinite(value):
        raise _bad(key, "a finite number", value)
    return int(value) if integer else float(value)


def parse_completion(body: Any, model_id: str) -> CompletionRequest:
    """Validate a /v1/completions body; every problem is a 400 naming the field."""
    if not isinstance(body, dict):
        raise ApiError(400, "body: expected a JSON object", code="invalid_json")
    model = body.get("model")
    if model is not None and model != model_id:
        raise ApiError(
            400,
            f"model: unknown model {model!r}; this server has {model_id!r}",
            param="model",
            code="model_not_found",
        )
    prompt = body.get("prompt", "")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    else:
        raise _bad("prompt", "a string or a non-empty list of strings", prompt)
    for key, off in UNSUPPORTED.items():
        if body.get(key, None) not in off:
            raise ApiError(
                400, f"{key}: not supported by this server", param=key, code="unsupported_parameter"
            )
    max_tokens = _number(body, "max_tokens", integer=True)
    if max_tokens is not None and not 0 <= max_tokens <= MAX_TOKENS_LIMIT:
        raise _bad("max_tokens", f"an integer in 0..{MAX_TOKENS_LIMIT}", max_tokens)
    temperature = _number(body, "temperature")
    if temperature is not None and temperature < 0:
        raise _bad("temperature", "a number >= 0", temperature)
    top_p = _number(body, "top_p")
    if top_p is not None and not 0 < top_p <= 1:
        raise _bad("top_p", "a number in (0, 1]", top_p)
    top_k = _number(body, "top_k", integer=True)
    if top_k is not None and top_k < -1:
        raise _bad("top_k", "an integer >= 0 (0 or -1: off)", top_k)
    rep = _number(body, "repetition_penalty")
    if rep is not None and rep <= 0:
        raise _bad("repetition_penalty", "a number > 0", rep)
    ngram = _number(body, "no_repeat_ngram_size", integer=True)
    if ngram is not None and ngram < 0:
        raise _bad("no_repeat_ngram_size", "an integer >= 0", ngram)
    seed = _number(body, "seed", integer=True)
    if seed is not None and not 0 <= seed < 2**63:
        raise _bad("seed", "an integer in 0..2^63-1", seed)
    n = _number(body, "n", integer=True)
    n = 1 if n is None else n
    if not 1 <= n <= MAX_N:
        raise _bad("n", f"an integer in 1..{MAX_N}", n)
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if (
        not isinstance(stops, list)
        or len(stops) > MAX_STOPS
        or not all(isinstance(s, str) and s for s in stops)
    ):
        raise _bad("stop", f"a non-empty string or a list of up to {MAX_STOPS} of them", stop)
    logprobs = _number(body, "logprobs", integer=True)
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise _bad("logprobs", f"an integer in 0..{MAX_LOGPROBS}", logprobs)
    flags = {}
    for key in ("stream", "echo"):
        value = body.get(key, False)
        if value is not None and not isinstance(value, bool):
            raise _bad(key, "true or false", value)
        flags[key] = bool(value)
    options = body.get("stream_options")
    options = {} if options is None else options
    if not isinstance(options, dict):
        raise _bad("stream_options", "an object", options)
    sampling = {
        "temperature": temperature,
        "top_p": top_p,
        "top_k": None if top_k is None else max(top_k, 0),
        "repetition_penalty": rep,
        "no_repeat_ngram_size": ngram,
        "max_new_tokens": max_tokens,
    }
    return CompletionRequest(
        prompts=prompts,
        sampling=sampling,
        seed=seed,
        n=n,
        stop=stops,
        stream=flags["stream"],
        include_usage=bool(options.get("include_usage", False)),
        logprobs=logprobs,
        echo=flags["echo"],
    )


# --- one choice's text ---------------------------------------------------------------------------------


@dataclass
class Choice:
    """Tokens -> text for one choice: UTF-8-safe pieces, stop strings cut (and held back while a
    piece could still be the start of one), logprob entries."""

    index: int
    decoder: StreamDecoder
    stops: list[str]
    want_logprobs: bool
    prefix: str = ""  # the echoed prompt
    text: str = ""  # generated so far (stop string cut off once found)
    sent: int = 0  # characters of ``text`` already handed out
    tokens: int = 0
    finish: str | None = None
    lp: dict[str, list] = field(
        default_factory=lambda: {"tokens": [], "token_logprobs": [], "top_logprobs": []}
    )
    offsets: list[int] = field(default_factory=list)

    def push(self, ev: TokenEvent, token_text: Callable[[int], str]) -> bool:
        """Take one token; True when a stop string ended the choice."""
        if ev.token == EOT_ID or self.finish:
            return False
        self.tokens += 1
        if self.want_logprobs:
            self.offsets.append(len(self.prefix) + len(self.text))
            self.lp["tokens"].append(token_text(ev.token))
            self.lp["token_logprobs"].append(ev.logprob)
            self.lp["top_logprobs"].append({token_text(t): v for t, v in ev.top or []} if ev.top else None)
        self.text += self.decoder.push(ev.token)
        return self._cut()

    def flush(self) -> None:
        if not self.finish:
            self.text += self.decoder.flush()
            self._cut()

    def _cut(self) -> bool:
        hits = [i for i in (self.text.find(s, max(0, self.sent - len(s))) for s in self.stops) if i >= 0]
        if not hits:
            return False
        self.text = self.text[: min(hits)]
        self.finish = "stop"
        return True

    def take(self, final: bool) -> str:
        """New text that can be sent; holds back a tail that may begin a stop string."""
        end = len(self.text)
        if not final and not self.finish and self.stops:
            end = max(self.sent, end - max(len(s) for s in self.stops) + 1)
        piece, self.sent = self.text[self.sent : end], max(self.sent, end)
        return piece

    def logprobs(self) -> dict[str, Any] | None:
        if not self.want_logprobs:
            return None
        keep = sum(1 for o in self.offsets if o < len(self.prefix) + len(self.text)) if self.finish else None
        out = {k: v[:keep] for k, v in self.lp.items()}
        out["text_offset"] = self.offsets[:keep]
        return out


class _Hub:
    """Scheduler thread -> event loop: channels with new items are woken together, once per
    scheduler step (one cross-thread call per step, not one per token)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.dirty: list[_Channel] = []

    def mark(self, channel: _Channel) -> None:
        with self.lock:
            self.dirty.append(channel)

    def flush(self) -> None:
        with self.lock:
            dirty, self.dirty = self.dirty, []
        by_loop: dict[asyncio.AbstractEventLoop, list[_Channel]] = {}
        for ch in dirty:
            by_loop.setdefault(ch.loop, []).append(ch)
        for loop, chans in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a loop already closed: nobody is waiting
                loop.call_soon_threadsafe(_wake_all, chans)


def _wake_all(chans: list[_Channel]) -> None:
    for ch in chans:
        with ch.lock:
            ch.marked = False
        ch.event.set()


class _Channel:
    """One request's items from the scheduler thread; ``get`` returns all that arrived."""

    def __init__(self, loop: asyncio.AbstractEventLoop, hub: _Hub) -> None:
        self.loop, self.hub = loop, hub
        self.items: deque = deque()
        self.lock = threading.Lock()
        self.event = asyncio.Event()
        self.marked = False

    def put(self, item: Any) -> None:
        with self.lock:
            self.items.append(item)
            if self.marked:
                return
            self.marked = True
        self.hub.mark(self)

    async def get(self) -> list:
        while True:
            self.event.clear()
            with self.lock:
                if self.items:
                    out = list(self.items)
                    self.items.clear()
                    return out
            await self.event.wait()


# --- the server ------------------------------------------------------------------------------------------


class Server:
    """The model, its scheduler and the request logic, independent of the HTTP framework."""

    def __init__(
        self,
        runtime: Runtime,
        *,
        model_id: str = DEFAULT_MODEL_ID,
        parallel: int = 16,
        max_queue: int = 64,
        threads: int = 1,
        processes: bool = False,
        api_key: str | None = None,
        json_logs: bool = False,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.runtime = runtime
        self.model_id = model_id
        self.api_key = api_key or None
        self.json_logs = json_logs
        self.log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        self.hub = _Hub()
        self.scheduler = open_scheduler(
            runtime,
            slots=parallel,
            max_queue=max_queue,
            threads=threads,
            after_step=self.hub.flush,
            processes=processes,
        )
        self.created = int(time.time())
        self._token_text: dict[int, str] = {}
        self._token_bytes: dict[int, bytes] = {}  # shared by the requests' stream decoders

    def close(self) -> None:
        self.scheduler.close()

    def token_text(self, tok: int) -> str:
        text = self._token_text.get(tok)
        if text is None:
            text = self._token_text[tok] = self.runtime.tokenizer.decode([tok], skip_special_tokens=False)
        return text

    def models(self) -> dict[str, Any]:
        cfg = self.runtime.config
        entry = {
            "id": self.model_id,
            "object": "model",
            "created": self.created,
            "owned_by": "gpts-edge",
            "context_length": cfg.context_length,
            "max_model_len": cfg.context_length,  # vLLM's name for it
        }
        return {"object": "list", "data": [entry]}

    def log_request(self, method: str, path: str, status: int, tokens: int, ms: float) -> None:
        if self.json_logs:
            line = json.dumps(
                {"method": method, "path": path, "status": status, "tokens": tokens, "ms": round(ms, 1)}
            )
        else:
            line = f"{method} {path} {status} tokens={tokens} {ms:.1f}ms"
        self.log(line)

    def _prompt_logprobs(self, ids: list[int]) -> list[tuple[int, float | None, dict | None]]:
        """(token, logprob, top) for every prompt token (the first has none), on the scheduler thread."""
        import numpy as np

        rt = self.runtime
        if not hasattr(rt, "forward_logits"):
            raise ApiError(400, "echo with logprobs: this runtime cannot score prompts", param="echo")
        logits = rt.forward_logits(np.asarray([ids], dtype=np.int64))[0].astype(np.float64)
        lp = logits - logits.max(-1, keepdims=True)
        lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
        return [(ids[0], None, None)] + [(ids[i], float(lp[i - 1, ids[i]]), None) for i in range(1, len(ids))]

    def score_prompts(self, req: CompletionRequest) -> Future | None:
        """For ``echo`` with ``logprobs``: each prompt's token logprobs, computed on the scheduler
        thread (the model has one owner); None when not asked for."""
        if not (req.echo and req.logprobs is not None):
            return None
        tok, ctx = self.runtime.tokenizer, self.runtime.config.context_length
        prompts = [(tok.encode(p).ids[-ctx:] if p else []) for p in req.prompts]
        return self.scheduler.call(lambda: [self._prompt_logprobs(ids) if ids else [] for ids in prompts])

    def start(
        self, req: CompletionRequest, channel: _Channel, prompt_scores: list | None = None
    ) -> tuple[list[Choice], list[Sequence], dict]:
        """Tokenize, build one sampler per choice and submit them all; raises ApiError."""
        rt = self.runtime
        try:
            opts = sampling_options(rt.generation_config, **req.sampling)
        except GptsError as exc:
            raise ApiError(400, str(exc).lstrip("-"), code="invalid_value") from None
        seed = req.seed if req.seed is not None else secrets.randbits(63)
        choices, seqs, info = [], [], {"prompt_tokens": 0, "truncated": []}
        # Streams and stop strings need each token as it comes; otherwise the tokens wait on the
        # scheduler thread and travel once, with the end of the choice.
        eager = req.stream or bool(req.stop)
        held: dict[int, list[TokenEvent]] = {}

        def on_token(i: int) -> Callable[[TokenEvent], None]:
            if eager:
                return lambda ev: channel.put(("token", i, ev))
            return held.setdefault(i, []).append

        def on_done(i: int) -> Callable[[str | None, Exception | None], None]:
            return lambda reason, err: channel.put(("done", i, reason, err, held.pop(i, [])))

        for p_index, prompt in enumerate(req.prompts):
            ids = rt.tokenizer.encode(prompt).ids if prompt else []
            for j in range(req.n):
                index = p_index * req.n + j
                sampler = SequenceSampler(
                    ids,
                    opts,
                    context_length=rt.config.context_length,
                    vocab_size=rt.config.vocab_size,
                    eos_id=EOT_ID,
                    seed=seed + j,
                )
                if j == 0:
                    info["prompt_tokens"] += len(sampler.prompt)
                    if sampler.truncated_from:
                        info["truncated"].append(f"{sampler.truncated_from}/{len(sampler.prompt)}")
                choice = Choice(
                    index, StreamDecoder(rt.tokenizer, self._token_bytes), req.stop, req.logprobs is not None
                )
                if req.echo:
                    choice.prefix = prompt
                choices.append(choice)
                seqs.append(
                    Sequence(
                        sampler,
                        on_token=on_token(index),
                        on_done=on_done(index),
                        logprobs=req.logprobs,
                        stream=eager,
                    )
                )
        for p_index, scored in enumerate(prompt_scores or []):
            for choice in choices[p_index * req.n : (p_index + 1) * req.n]:
                self._echo_logprobs(choice, scored)
        try:
            self.scheduler.submit(seqs)
        except QueueFull as exc:
            raise ApiError(429, str(exc), code="queue_full") from None
        return choices, seqs, info

    def _echo_logprobs(self, choice: Choice, scored: list) -> None:
        text = ""
        for tok, value, _ in scored:
            choice.offsets.append(len(text))
            choice.lp["tokens"].append(self.token_text(tok))
            choice.lp["token_logprobs"].append(value)
            choice.lp["top_logprobs"].append(None)
            text += self.token_text(tok)

    async def run(
        self, choices: list[Choice], seqs: list[Sequence], channel: _Channel
    ) -> AsyncIterator[list]:
        """Yield lists of (choice, piece, finished) as tokens arrive, one piece per choice for
        what arrived together (several tokens when the scheduler sent several); cancels on exit."""
        open_ = len(choices)
        try:
            while open_:
                out = []
                fresh: dict[int, Choice] = {}  # choices with new tokens, in order of arrival
                for item in await channel.get():
                    choice = choices[item[1]]
                    if item[0] == "token":
                        if choice.push(item[2], self.token_text):
                            seqs[item[1]].cancel()  # a stop string: nothing more to generate
                        fresh[item[1]] = choice
                    else:
                        fresh.pop(item[1], None)  # its last piece below takes all its text
                        _, _, reason, err, events = item
                        for ev in events:
                            choice.push(ev, self.token_text)
                        if err is not None:
                            raise ApiError(503, f"generation failed: {err}", code="generation_failed")
                        choice.flush()
                        choice.finish = choice.finish or reason or "stop"
                        open_ -= 1
                        out.append((choice, choice.take(True), True))
                yield [(choice, choice.take(False), False) for choice in fresh.values()] + out
        finally:
            for seq in seqs:
                seq.cancel()


def completion_body(server: Server, rid: str, choices: list[Choice], info: dict) -> dict[str, Any]:
    completion = sum(c.tokens for c in choices)
    body = {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": server.model_id,
        "choices": [
            {"index": c.index, "text": c.prefix + c.text, "logprobs": c.logprobs(), "finish_reason": c.finish}
            for c in choices
        ],
        "usage": {
            "prompt_tokens": info["prompt_tokens"],
            "completion_tokens": completion,
            "total_tokens": info["prompt_tokens"] + completion,
        },
    }
    if info["truncated"]:
        body["warnings"] = [
            f"prompt of {t.split('/')[0]} tokens is longer than the context; kept the last {t.split('/')[1]}"
            for t in info["truncated"]
        ]
    return body
