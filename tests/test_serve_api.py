"""`gpts-edge serve` over a live uvicorn server on 127.0.0.1, with the official openai client:
completions, streaming, stop, logprobs, echo, n, seeds, parity with `gpts-edge generate`, every
error case with its status and OpenAI-style body, API key, queue limit, disconnects, and a bounded
load test whose batched results equal sequential ones."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from gpts_edge.completions import MAX_BODY_BYTES, TRUNCATED_HEADER  # noqa: E402
from gpts_edge.engines import usable_cores  # noqa: E402
from gpts_edge.generation import generate_text, sampling_options  # noqa: E402
from gpts_edge.serve import create_app, open_server  # noqa: E402

from .conftest import REPO, run_cli  # noqa: E402

PROMPT = "The future of AI is"


class Live:
    """A Server on a uvicorn thread at a free port on 127.0.0.1."""

    def __init__(self, **kwargs) -> None:
        self.logs: list[str] = []
        self.server = open_server(None, log=self.logs.append, **kwargs)
        config = uvicorn.Config(
            create_app(self.server), host="127.0.0.1", port=0, log_level="warning", lifespan="off"
        )
        self.uv = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.uv.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.uv.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        self.port = self.uv.servers[0].sockets[0].getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}/v1"

    def client(self, key: str = "none"):
        return openai.OpenAI(base_url=self.base, api_key=key, max_retries=0, timeout=60)

    def raw(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.request(method, path, body=body, headers={"content-type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        return resp.status, dict(resp.getheaders()), data

    def close(self) -> None:
        self.uv.should_exit = True
        self.thread.join(timeout=10)
        self.server.close()


@pytest.fixture(scope="module")
def live():
    """Two threads: two engine processes of 32 rows each, as `gpts-edge serve --threads 2` runs."""
    s = Live(parallel=64, max_queue=256, threads=2)
    assert s.server.scheduler.engines == 2
    yield s
    s.close()


@pytest.fixture(scope="module", params=["engine-process", "in-process"])
def small(request):
    """One row, no queue, an API key, JSON logs: for 401, 429, disconnects and --json-logs; with
    the row in an engine process and with it on a thread of the server (``--in-process``)."""
    s = Live(
        parallel=1, max_queue=0, api_key="sesame", json_logs=True, in_process=request.param == "in-process"
    )
    yield s
    s.close()


def _solo(live: Live, prompt: str, seed: int, **overrides) -> str:
    rt = live.server.runtime
    opts = sampling_options(rt.generation_config, **overrides)
    return "".join(generate_text(rt, prompt, opts, seed=seed))


def test_models_lists_the_model_with_its_context_length(live) -> None:
    models = live.client().models.list().data
    assert [m.id for m in models] == ["gpt-s-1.4m"]
    assert models[0].model_extra["context_length"] == 384
    status, _, data = live.raw("GET", "/health")
    health = json.loads(data)
    assert status == 200 and health["status"] == "ok"
    assert health["engines"] == health["engines_alive"] == 2  # the fixture's two engine processes


def test_greedy_and_seeded_completions_equal_gpts_edge_generate(live) -> None:
    c = live.client()
    greedy = c.completions.create(model="gpt-s-1.4m", prompt=PROMPT, max_tokens=24, temperature=0)
    seeded = c.completions.create(model="gpt-s-1.4m", prompt=PROMPT, max_tokens=24, seed=2)
    for args, got in ((["--greedy"], greedy), (["--seed", "2"], seeded)):
        cli = run_cli("generate", PROMPT, "--max-new-tokens", "24", *args)
        assert cli.returncode == 0, cli.stderr
        assert PROMPT + got.choices[0].text == cli.stdout.rstrip("\n")
    assert greedy.choices[0].finish_reason == "length"
    assert greedy.usage.completion_tokens == 24
    assert greedy.usage.prompt_tokens == len(live.server.runtime.tokenizer.encode(PROMPT).ids)
    assert greedy.usage.total_tokens == greedy.usage.prompt_tokens + 24


def test_streamed_chunks_concatenate_to_the_non_streamed_text(live) -> None:
    c = live.client()
    whole = c.completions.create(model="gpt-s-1.4m", prompt=PROMPT, max_tokens=40, seed=11)
    chunks = list(
        c.completions.create(
            model="gpt-s-1.4m",
            prompt=PROMPT,
            max_tokens=40,
            seed=11,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    pieces = [ch.choices[0].text for ch in chunks if ch.choices]
    # Streamed, not one blob: the first token travels at once; later ones together (every 10 ms).
    assert len(pieces) >= 2 and len(pieces[0]) < len(whole.choices[0].text) // 2
    assert "".join(pieces) == whole.choices[0].text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 40


def test_same_seed_same_text_and_other_seeds_differ(live) -> None:
    c = live.client()
    texts = [
        c.completions.create(prompt=PROMPT, model="gpt-s-1.4m", max_tokens=30, seed=s).choices[0].text
        for s in (3, 3, 4)
    ]
    assert texts[0] == texts[1] != texts[2]


def test_stop_string_is_cut_with_finish_reason_stop_also_when_streamed(live) -> None:
    c = live.client()
    full = _solo(live, PROMPT, 0, temperature=0.0, max_new_tokens=40)
    words = full.split(" ")
    stop = " " + words[len(words) // 2]
    expect = full[: full.index(stop)]
    got = c.completions.create(
        model="gpt-s-1.4m", prompt=PROMPT, max_tokens=40, temperature=0, stop=[stop, "zzzq"]
    )
    assert got.choices[0].text == expect and got.choices[0].finish_reason == "stop"
    assert got.usage.completion_tokens < 40
    stream = c.completions.create(
        model="gpt-s-1.4m", prompt=PROMPT, max_tokens=40, temperature=0, stop=stop, stream=True
    )
    chunks = [ch.choices[0] for ch in stream]
    assert "".join(ch.text for ch in chunks) == expect
    assert chunks[-1].finish_reason == "stop"


def test_logprobs_give_the_top_alternatives_of_each_token(live) -> None:
    got = (
        live.client()
        .completions.create(
            model="gpt-s-1.4m",
            prompt=PROMPT,
            max_tokens=8,
            temperature=0,
            extra_body={"no_repeat_ngram_size": 0, "repetition_penalty": 1.0},
            logprobs=3,
        )
        .choices[0]
    )
    lp = got.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 8
    assert "".join(lp.tokens) == got.text
    for tok, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 3 and value <= 0
        best = max(top, key=top.get)
        # Greedy with no penalties takes the most likely token: its logprob is the top one.
        assert best == tok and top[best] == pytest.approx(value, abs=1e-9)
    assert lp.text_offset == sorted(lp.text_offset)


def test_echo_returns_the_prompt_and_its_logprobs(live) -> None:
    got = (
        live.client()
        .completions.create(
            model="gpt-s-1.4m", prompt=PROMPT, max_tokens=5, temperature=0, echo=True, logprobs=0
        )
        .choices[0]
    )
    solo = _solo(live, PROMPT, 0, temperature=0.0, max_new_tokens=5)
    assert got.text == PROMPT + solo
    n_prompt = len(live.server.runtime.tokenizer.encode(PROMPT).ids)
    lp = got.logprobs
    assert len(lp.tokens) == n_prompt + 5
    assert "".join(lp.tokens) == got.text
    assert lp.token_logprobs[0] is None and all(v < 0 for v in lp.token_logprobs[1:])


def test_n_choices_and_prompt_lists_use_consecutive_seeds(live) -> None:
    c = live.client()
    got = c.completions.create(
        model="gpt-s-1.4m", prompt=[PROMPT, "Once upon a time"], max_tokens=12, seed=5, n=3
    )
    assert [ch.index for ch in got.choices] == list(range(6))
    for ch in got.choices:
        prompt = [PROMPT, "Once upon a time"][ch.index // 3]
        assert ch.text == _solo(live, prompt, 5 + ch.index % 3, max_new_tokens=12)
    assert all(ch.finish_reason in ("stop", "length") for ch in got.choices)
    assert 0 < got.usage.completion_tokens <= 6 * 12


def test_long_prompt_keeps_its_end_and_says_so(live) -> None:
    prompt = "word " * 600
    n_tokens = len(live.server.runtime.tokenizer.encode(prompt).ids)
    body = json.dumps({"prompt": prompt, "max_tokens": 3, "temperature": 0}).encode()
    status, headers, data = live.raw("POST", "/v1/completions", body)
    assert status == 200
    out = json.loads(data)
    assert headers[TRUNCATED_HEADER] == f"{n_tokens}/384"
    assert out["usage"]["prompt_tokens"] == 384 and "kept the last 384" in out["warnings"][0]


ERRORS = [
    ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    (b'{"prompt": "x", "temperature": NaN}', 400, "temperature"),
    ({"prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ({"prompt": "x", "model": "gpt-4"}, 400, "model"),
    ({"prompt": 42}, 400, "prompt"),
    ({"prompt": ["a", 3]}, 400, "prompt"),
    ({"prompt": "x", "n": 5}, 400, "n"),
    ({"prompt": "x", "logprobs": 6}, 400, "logprobs"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "seed": -1}, 400, "seed"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"prompt": "x", "best_of": 3}, 400, "best_of"),
    ([1, 2], 400, None),
    (b"{not json", 400, None),
    (b"\xff\xfe", 400, None),
    (b'{"prompt": "' + b"a" * (MAX_BODY_BYTES + 10) + b'"}', 413, None),
]


@pytest.mark.parametrize(
    ("body", "status", "param"), ERRORS, ids=[f"{e[1]}-{e[2]}-{i}" for i, e in enumerate(ERRORS)]
)
def test_bad_requests_get_openai_style_errors(live, body, status, param) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    got, _, data = live.raw("POST", "/v1/completions", raw)
    assert got == status
    err = json.loads(data)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and err["message"] and err["type"] == "invalid_request_error"


def test_bad_request_through_the_openai_client_raises_its_error_type(live) -> None:
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        live.client().completions.create(model="gpt-s-1.4m", prompt="x", max_tokens=-3)


def test_unknown_route_chat_and_wrong_method(live) -> None:
    status, _, data = live.raw("GET", "/v1/nothing")
    assert status == 404 and json.loads(data)["error"]["type"] == "not_found_error"
    status, _, data = live.raw("GET", "/v1/completions")
    assert status == 405 and "error" in json.loads(data)
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        live.client().chat.completions.create(
            model="gpt-s-1.4m", messages=[{"role": "user", "content": "hi"}]
        )


def test_api_key_is_required_on_v1_but_not_on_health(small) -> None:
    with pytest.raises(openai.AuthenticationError):
        small.client("wrong").models.list()
    status, _, data = small.raw("POST", "/v1/completions", b'{"prompt": "x"}')
    assert status == 401 and json.loads(data)["error"]["code"] == "invalid_api_key"
    assert small.raw("GET", "/health")[0] == 200
    assert small.client("sesame").models.list().data[0].id == "gpt-s-1.4m"


def test_disconnect_mid_stream_stops_generation_and_full_queue_is_429(small) -> None:
    # Greedy: a sampled continuation (a fresh random seed per request) can reach <|endoftext|>
    # and free the row before the second request; greedy from "x" does not in 3,000 tokens.
    body = json.dumps({"prompt": "x", "max_tokens": 16000, "stream": True, "temperature": 0}).encode()
    sock = socket.create_connection(("127.0.0.1", small.port), timeout=10)
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"authorization: Bearer sesame\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    received = b""
    while b"data:" not in received:  # the headers may come in their own packet
        chunk = sock.recv(4096)
        assert chunk, "connection closed before the first event"
        received += chunk
    # The only row is busy and the queue holds nothing: the next request is refused.
    with pytest.raises(openai.RateLimitError, match="busy"):
        small.client("sesame").completions.create(model="gpt-s-1.4m", prompt="y", max_tokens=2)
    sock.close()
    deadline = time.monotonic() + 20
    while small.server.scheduler.load()["active"]:
        assert time.monotonic() < deadline, "generation went on after the client left"
        time.sleep(0.05)
    stats = small.server.scheduler.load()
    assert stats["cancelled"] >= 1 and stats["tokens"] < 16000
    ok = small.client("sesame").completions.create(model="gpt-s-1.4m", prompt="y", max_tokens=2)
    assert ok.usage.completion_tokens == 2


def test_a_non_streaming_client_that_leaves_stops_its_generation(small) -> None:
    before = small.server.scheduler.load()
    log_start = len(small.logs)
    body = json.dumps({"prompt": "x", "max_tokens": 16000, "temperature": 0}).encode()  # greedy: no end
    sock = socket.create_connection(("127.0.0.1", small.port), timeout=10)
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"authorization: Bearer sesame\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    deadline = time.monotonic() + 20
    while small.server.scheduler.load()["tokens"] - before["tokens"] < 50:  # it is generating
        assert time.monotonic() < deadline
        time.sleep(0.02)
    sock.close()
    while small.server.scheduler.load()["active"]:
        assert time.monotonic() < deadline, "generation went on after the client left"
        time.sleep(0.05)
    after = small.server.scheduler.load()
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["tokens"] - before["tokens"] < 16000
    while len(small.logs) == log_start:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert " 499 " in small.logs[log_start] or '"status": 499' in small.logs[log_start]
    # The row is free again.
    ok = small.client("sesame").completions.create(model="gpt-s-1.4m", prompt="y", max_tokens=2)
    assert ok.usage.completion_tokens == 2


def test_request_log_has_one_line_per_request(live) -> None:
    start = len(live.logs)
    live.client().completions.create(model="gpt-s-1.4m", prompt="log me", max_tokens=3, temperature=0)
    deadline = time.monotonic() + 5
    while len(live.logs) == start:  # a line is written just after the response's last byte
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert len(live.logs) == start + 1
    assert live.logs[start].startswith("POST /v1/completions 200 tokens=3 ") and live.logs[start].endswith(
        "ms"
    )


def test_load_of_64_clients_times_3_requests_equals_sequential_results(live) -> None:
    rt = live.server.runtime
    prompts = ["Once upon a time", PROMPT, "In 1990, the", ""]
    jobs = [(c, r) for c in range(64) for r in range(3)]

    def run_client(c: int) -> list[str]:
        client = live.client()
        out = []
        for r in range(3):
            got = client.completions.create(
                model="gpt-s-1.4m", prompt=prompts[(c + r) % 4], max_tokens=6 + (c % 5), seed=1000 * r + c
            )
            out.append(got.choices[0].text)
        return out

    before = live.server.scheduler.load()
    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(run_client, range(64)))
    after = live.server.scheduler.load()
    # Requests were decoded together: decode-step tokens (the first token of each request comes
    # from its prefill) per batched step.
    steps = after["steps"] - before["steps"]
    assert (after["tokens"] - before["tokens"] - len(jobs)) / steps >= 2
    for c, r in jobs:
        opts = sampling_options(rt.generation_config, max_new_tokens=6 + (c % 5))
        expect = "".join(generate_text(rt, prompts[(c + r) % 4], opts, seed=1000 * r + c))
        assert results[c][r] == expect, (c, r)


def test_missing_serve_extra_is_one_error_line(tmp_path: Path) -> None:
    fake = tmp_path / "uvicorn"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('simulated: not installed')\n")
    proc = run_cli("serve", env={"PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: gpts-edge serve needs the 'serve' extra (uvicorn missing): pip install 'gpts-edge[serve]'"
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--parallel", "0"], "error: --parallel: expected 1..256, found 0"),
        (["--port", "70000"], "error: --port: expected 0..65535, found 70000"),
        (["--threads", "-1"], "error: --threads: expected 0 (every core) or a positive integer, found -1"),
    ],
)
def test_bad_serve_options_are_one_error_line(args, message) -> None:
    proc = run_cli("serve", *args)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [message]


def _engines_by_default(parallel: int) -> str:
    n = min(usable_cores(), parallel)  # one engine per usable core, at most one per row
    return f"in {n} engine process{'es' if n > 1 else ''}"


@pytest.mark.parametrize(
    ("args", "where"),
    [
        (["--threads", "2"], "in 2 engine processes"),
        (["--threads", "2", "--in-process"], "on 2 scheduler threads"),
        ([], _engines_by_default(16)),
        (["--parallel", "1"], "in 1 engine process,"),
    ],
)
def test_serve_says_where_it_decodes(args, where) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpts_edge.cli", "serve", "--port", "0", *args],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        first = proc.stderr.readline()  # printed once decoding has started, before the socket opens
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert first.startswith("serving gpt-s-1.4m (OnnxRuntime, batched decode graph ") and where in first, (
        first
    )


def test_bench_script_reports_every_level(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "serve_bench.py"), "--clients", "1,3", "--threads", "1"]
        + ["--requests", "1", "--repeat", "1", "--max-tokens", "4", "--modes", "defaults,stream", "--json"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    runs = json.loads(proc.stdout)["runs"]
    assert [(r["mode"], r["threads"], r["clients"]) for r in runs] == [
        (mode, 1, clients) for mode in ("defaults", "stream") for clients in (1, 3)
    ]
    # Whole answers and streams alike: every token counted (a stream's from its last event).
    assert all(r["tokens"] == 4 * r["clients"] and r["tok_s"] > 0 for r in runs)


def test_json_logs_are_one_object_per_request(small) -> None:
    start = len(small.logs)
    small.raw("GET", "/health")
    small.raw("GET", "/v1/models")  # no key: 401
    deadline = time.monotonic() + 5
    while len(small.logs) < start + 2:  # a line is written just after the response's last byte
        assert time.monotonic() < deadline
        time.sleep(0.01)
    entries = [json.loads(line) for line in small.logs[start : start + 2]]
    assert [(e["method"], e["path"], e["status"]) for e in entries] == [
        ("GET", "/health", 200),
        ("GET", "/v1/models", 401),
    ]
    assert all(e["tokens"] == 0 and e["ms"] >= 0 for e in entries)
