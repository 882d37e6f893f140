"""Engine processes (gpts_edge/engines.py): what a server needs of decoding in child processes
beyond the tokens (tested with the other schedulers in test_serve_batching.py): cancels, a bound
queue, an engine that dies or cannot start, and no engine outliving its server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from gpts_edge import engines
from gpts_edge.api import open_runtime
from gpts_edge.batching import QueueFull, Sequence
from gpts_edge.engines import EngineProcesses
from gpts_edge.errors import GptsError
from gpts_edge.generation import generate_ids, sampling_options
from gpts_edge.sampling import SequenceSampler


@pytest.fixture(scope="module")
def rt():
    return open_runtime("onnx", None)  # the bundled model's cached export (it has the decode graph)


def _seq(rt, ids, seed, *, max_new_tokens=10_000, stream=True):
    # No stop at the end-of-text token: a long sequence must still be running when the test
    # looks (when it would end depends on the machine's speed, not on the tokens).
    opts = replace(sampling_options(rt.generation_config, max_new_tokens=max_new_tokens), stop_at_eos=False)
    cfg = rt.config
    sampler = SequenceSampler(
        ids, opts, context_length=cfg.context_length, vocab_size=cfg.vocab_size, seed=seed
    )
    out = {"tokens": [], "done": threading.Event(), "first": threading.Event()}

    def on_token(ev):
        out["tokens"].append(ev.token)
        out["first"].set()

    def on_done(reason, err):
        out["reason"], out["err"] = reason, err
        out["done"].set()

    return Sequence(sampler, on_token=on_token, on_done=on_done, stream=stream), out


def _gone(pid: int) -> bool:
    """No such process, or a zombie nobody has reaped yet (it runs no code)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


def test_a_cancel_reaches_the_engine_and_frees_its_row(rt) -> None:
    eng = EngineProcesses(rt, engines=1, slots=1, max_queue=4)
    try:
        seq, out = _seq(rt, [1, 2], 0)
        eng.submit([seq])
        assert out["first"].wait(30)
        seq.cancel()
        assert out["done"].wait(30)
        assert out["reason"] == "stop" and out["err"] is None and len(out["tokens"]) < 10_000
        # The row is free again: the next sequence runs to its end with its solo tokens.
        nxt, got = _seq(rt, [3, 4], 5, max_new_tokens=6, stream=False)
        eng.submit([nxt])
        assert got["done"].wait(30)
        assert got["tokens"] == list(generate_ids(rt, [3, 4], nxt.sampler.opts, seed=5))
        load = eng.load()
        assert load["cancelled"] == 1 and load["active"] == 0 and load["pending"] == 0
    finally:
        eng.close()


def test_a_streams_first_token_travels_at_once_and_later_ones_together(rt) -> None:
    # One message per step would cost a stream a quarter of its tokens/s: later tokens wait up to
    # STREAM_EVERY_S to travel together, but the first goes at once (the time to a first token).
    messages = [0]
    eng = EngineProcesses(rt, engines=1, slots=1, after_step=lambda: messages.__setitem__(0, messages[0] + 1))
    try:
        seq, out = _seq(rt, [1, 2], 3, max_new_tokens=64)
        arrived_in: list[int] = []  # the message each token came in (on_token runs before after_step)
        on_token = seq.on_token
        seq.on_token = lambda ev: (arrived_in.append(messages[0]), on_token(ev))
        eng.submit([seq])
        assert out["done"].wait(60)
    finally:
        eng.close()
    assert out["tokens"] == list(generate_ids(rt, [1, 2], seq.sampler.opts, seed=3))
    # The first token is not held: it travels after its scheduler round (the prompt's run, whose
    # token it is, and the round's decode step, which makes the second).
    assert arrived_in.count(arrived_in[0]) <= 2
    # 64 tokens take well over 10 ms on any machine this runs on, and well under 5 ms a step.
    assert len(set(arrived_in)) <= len(arrived_in) // 2, arrived_in


def test_engines_bound_their_queue_over_all_of_them(rt) -> None:
    eng = EngineProcesses(rt, engines=2, slots=2, max_queue=1)
    outs = []
    try:
        for k in range(3):  # a row on each engine, then one may wait; the next is refused
            seq, out = _seq(rt, [1, 2], k)
            eng.submit([seq])
            outs.append(out)
        with pytest.raises(QueueFull, match="--parallel 2, --max-queue 1"):
            eng.submit([_seq(rt, [4], 3)[0]])
        assert sorted(load["active"] + load["pending"] for load in eng.loads()) == [1, 2]
    finally:
        eng.close()
    # Closing ends every sequence, decoding or waiting, with an error rather than silence.
    assert all(out["done"].wait(20) for out in outs)
    assert all("shutting down" in str(out["err"]) for out in outs)


def test_an_engine_that_dies_ends_its_sequences_and_is_replaced(rt) -> None:
    eng = EngineProcesses(rt, engines=2, slots=2, max_queue=4)
    try:
        first, out = _seq(rt, [1, 2], 0)
        eng.submit([first])  # the least loaded engine: the first
        assert out["first"].wait(30)
        dead = eng.pids[0]
        os.kill(dead, signal.SIGKILL)
        assert out["done"].wait(30)
        assert out["reason"] is None and "engine process 0 stopped" in str(out["err"])
        deadline = time.monotonic() + 60
        while eng.pids[0] == dead or eng.load()["engines_alive"] != 2:
            assert time.monotonic() < deadline, "the dead engine was not replaced"
            time.sleep(0.1)
        # Both engines (one sequence each: the least loaded takes the next) give solo tokens.
        runs = [_seq(rt, [7, 8, 9], 11 + k, max_new_tokens=5) for k in range(2)]
        for seq, _ in runs:
            eng.submit([seq])
        for seq, got in runs:
            assert got["done"].wait(30) and got["err"] is None
            assert got["tokens"] == list(generate_ids(rt, [7, 8, 9], seq.sampler.opts, seed=seq.sampler.seed))
        assert all(load["steps"] > 0 for load in eng.loads())
        assert eng.load()["tokens"] >= 10  # the replaced engine's count is kept in the total
    finally:
        eng.close()


def test_an_engine_out_of_restarts_stays_down_and_the_server_says_so(rt) -> None:
    eng = EngineProcesses(rt, engines=1, slots=1, restarts=0)
    try:
        os.kill(eng.pids[0], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while eng.load()["engines_alive"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with pytest.raises(GptsError, match="every engine process has stopped"):
            eng.submit([_seq(rt, [1], 1, max_new_tokens=1)[0]])
    finally:
        eng.close()


def test_an_engine_that_cannot_open_the_model_stops_the_start_with_its_reason(rt, monkeypatch) -> None:
    # Engines load the graph the server hands them; one they cannot load (here: not a graph at
    # all) is refused in the engine, and the start fails with the engine's reason.
    monkeypatch.setattr(engines, "_graph_for_engines", lambda _rt: b"not an onnx graph")
    with pytest.raises(GptsError, match=r"engine process \d: .*cannot run the decode graph batched"):
        EngineProcesses(rt, engines=2, slots=2)


SCRIPT = """
import os, sys
from gpts_edge.api import open_runtime
from gpts_edge.engines import open_scheduler
rt = open_runtime("onnx", None)
eng = open_scheduler(rt, slots=2, threads=2, processes=True)
print(" ".join(map(str, eng.pids)), flush=True)
if sys.argv[1] == "leave":
    os._exit(0)  # no close(): the engines must notice and leave by themselves
eng.close()
print("closed", flush=True)
"""


@pytest.mark.parametrize("how", ["close", "leave"])
def test_engines_start_from_a_script_without_a_main_guard_and_never_outlive_it(tmp_path, how) -> None:
    # Top-level code, no `if __name__ == "__main__"`: starting engines must not re-run it.
    script = tmp_path / "app.py"
    script.write_text(textwrap.dedent(SCRIPT))
    proc = subprocess.run(
        [sys.executable, str(script), how], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split("\n")
    pids = [int(p) for p in lines[0].split()]
    assert len(pids) == 2
    assert ("closed" in lines) == (how == "close")
    deadline = time.monotonic() + 30
    while not all(_gone(p) for p in pids):
        assert time.monotonic() < deadline, f"engine processes {pids} outlived their server"
        time.sleep(0.1)
