"""Continuous batching without a socket: the batched decode graph against batch-1 steps, and
sequences joining and leaving the batch getting exactly their solo tokens."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from gpts_edge.api import open_runtime
from gpts_edge.batching import QueueFull, Scheduler, SchedulerPool, Sequence
from gpts_edge.engines import EngineProcesses, open_scheduler
from gpts_edge.errors import GptsError
from gpts_edge.generation import generate_ids, sampling_options
from gpts_edge.runtimes.onnx_batch import BatchedDecoder
from gpts_edge.sampling import SequenceSampler


@pytest.fixture(scope="module")
def rt():
    return open_runtime("onnx", None)  # the bundled model's cached export (it has the decode graph)


def _sampler(rt, ids, opts, seed):
    cfg = rt.config
    return SequenceSampler(ids, opts, context_length=cfg.context_length, vocab_size=cfg.vocab_size, seed=seed)


class _Collect:
    """Submit sequences and wait for all of them to finish."""

    def __init__(self) -> None:
        self.tokens: dict[int, list[int]] = {}
        self.reasons: dict[int, str | None] = {}
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.left = 0

    def seq(self, key: int, sampler: SequenceSampler) -> Sequence:
        self.tokens[key] = []
        self.left += 1

        def on_done(reason, err):
            with self.lock:
                self.reasons[key] = reason if err is None else f"error: {err}"
                self.left -= 1
                if self.left == 0:
                    self.done.set()

        # Every other sequence says nobody reads its tokens before the end (an engine process
        # then sends them with the end): both ways must give the same tokens.
        return Sequence(
            sampler,
            on_token=lambda ev: self.tokens[key].append(ev.token),
            on_done=on_done,
            stream=key % 2 == 0,
        )


def test_batched_decode_rows_equal_batch_one_steps(rt) -> None:
    bd = BatchedDecoder(rt, slots=6)
    rng = np.random.default_rng(0)
    prompts = [list(map(int, rng.integers(1, 4096, n))) for n in (5, 17, 1, 40, 3)]
    solo = []
    for p in prompts:
        logits, cache = rt.step(np.array(p), rt.new_cache())
        rows = [logits]
        for t in range(8):
            logits, cache = rt.step(np.array([100 + t]), cache)
            rows.append(logits)
        solo.append(rows)
    batched = [[bd.prefill(r, p).copy()] for r, p in enumerate(prompts)]
    for t in range(8):
        out = bd.decode([100 + t] * len(prompts))
        for r in range(len(prompts)):
            batched[r].append(out[r].copy())
    diff = max(
        float(np.abs(a - b).max())
        for r in range(len(prompts))
        for a, b in zip(solo[r], batched[r], strict=True)
    )
    assert diff <= 1e-5, diff  # measured 0.0: each row is computed as alone


def test_moving_a_row_keeps_its_cache(rt) -> None:
    bd = BatchedDecoder(rt, slots=3)
    bd.prefill(0, [5, 6, 7])
    bd.prefill(2, [11, 12, 13, 14])
    expect = bd.decode([1, 2, 3])[2].copy()  # rows 0..2; row 1 holds garbage, row 2 is ours
    bd.prefill(2, [11, 12, 13, 14])
    bd.move(2, 1)
    got = bd.decode([1, 3])[1]
    assert np.array_equal(got, expect)


@pytest.mark.parametrize(
    ("batched", "threads"),
    [(True, 1), (False, 1), (True, 2), ("pool", 2), ("processes", 2)],
    ids=[
        "batched-decode-graph",
        "per-row-steps",
        "batched-2-threads-sampling-pool",
        "two-schedulers",
        "two-engine-processes",
    ],
)
def test_sequences_joining_and_leaving_get_their_solo_tokens(rt, batched, threads) -> None:
    tok = rt.tokenizer
    texts = ["Once upon a time", "The future of AI is", "", "In 1990, the city of"]
    cases = []
    for i in range(10):
        ids = tok.encode(texts[i % 4]).ids if texts[i % 4] else []
        greedy = i % 3 == 0
        opts = sampling_options(rt.generation_config, greedy=greedy, max_new_tokens=5 + 7 * (i % 4))
        cases.append((ids, opts, 100 + i))
    # One prompt near the end of the context, so it slides while others decode.
    long_ids = [int(t) for t in np.random.default_rng(1).integers(1, 4096, 378)]
    cases.append((long_ids, sampling_options(rt.generation_config, max_new_tokens=12), 7))
    # And one longer than the context: it keeps its end, and slides right after its first token.
    cases.append((long_ids * 2, sampling_options(rt.generation_config, max_new_tokens=4), 8))
    if batched == "pool":
        sch = open_scheduler(rt, slots=4, max_queue=64, threads=threads)
        assert isinstance(sch, SchedulerPool) and sch.engines == 2
    elif batched == "processes":
        sch = open_scheduler(rt, slots=4, max_queue=64, threads=threads, processes=True)
        assert isinstance(sch, EngineProcesses) and sch.engines == 2
    else:
        sch = Scheduler(rt, slots=4, max_queue=64, batched=batched, threads=threads)
    try:
        assert sch.batched is bool(batched)
        col = _Collect()
        # Staggered: the first four start together, the rest join as rows free up.
        sch.submit([col.seq(k, _sampler(rt, *c)) for k, c in enumerate(cases[:4])])
        sch.submit([col.seq(k + 4, _sampler(rt, *c)) for k, c in enumerate(cases[4:])])
        assert col.done.wait(60)
        stats = sch.load()
    finally:
        sch.close()
    for k, (ids, opts, seed) in enumerate(cases):
        assert col.tokens[k] == list(generate_ids(rt, ids, opts, seed=seed)), k
        assert col.reasons[k] in ("stop", "length")
    # Two schedulers (or engines) of two rows each: no batch is over 2, and both decoded.
    two = batched in ("pool", "processes")
    assert stats["max_batch"] == (2 if two else 4) and stats["active"] == 0
    if batched == "pool":
        assert all(s.load()["steps"] > 0 for s in sch.schedulers)
    if batched == "processes":
        assert all(load["steps"] > 0 for load in sch.loads())


def test_batched_prefill_rows_equal_batch_one_prefills(rt) -> None:
    rng = np.random.default_rng(4)
    together, alone = BatchedDecoder(rt, slots=6), BatchedDecoder(rt, slots=6)
    for length in (1, 7, 384):
        prompts = [list(map(int, rng.integers(1, 4096, length))) for _ in range(4)]
        got = together.prefill_rows(1, prompts)
        want = np.stack([alone.prefill(1 + i, p) for i, p in enumerate(prompts)])
        assert np.array_equal(got, want), length  # measured: bit for bit
        assert np.array_equal(together.kv[:, :, 1:5, :, :length], alone.kv[:, :, 1:5, :, :length])
    with pytest.raises(GptsError, match="one length"):
        together.prefill_rows(0, [[1, 2], [3]])


@pytest.mark.parametrize("batched", [True, False], ids=["batched-decode-graph", "per-row-steps"])
def test_sequences_joining_together_share_a_prefill_per_prompt_length(rt, batched) -> None:
    tok = rt.tokenizer
    texts = ["Once upon a time", "The future of AI is", "Once upon a time", "The future of AI is", "x"]
    opts = sampling_options(rt.generation_config, max_new_tokens=6)
    cases = [(tok.encode(t).ids, 40 + i) for i, t in enumerate(texts)]
    assert len({len(ids) for ids, _ in cases}) == 3
    sch = Scheduler(rt, slots=8, batched=batched)
    try:
        col = _Collect()
        sch.submit([col.seq(k, _sampler(rt, ids, opts, seed)) for k, (ids, seed) in enumerate(cases)])
        assert col.done.wait(60)
        stats = sch.load()
    finally:
        sch.close()
    assert stats["prefills"] == 3  # one run per prompt length, in the same step
    for k, (ids, seed) in enumerate(cases):
        assert col.tokens[k] == list(generate_ids(rt, ids, opts, seed=seed)), k


def test_a_full_queue_refuses_new_sequences(rt) -> None:
    sch = Scheduler(rt, slots=1, max_queue=1)
    opts = sampling_options(rt.generation_config, max_new_tokens=10_000)
    col = _Collect()
    try:
        sch.submit([col.seq(0, _sampler(rt, [1, 2], opts, 0)), col.seq(1, _sampler(rt, [1, 2], opts, 1))])
        with pytest.raises(QueueFull, match="--max-queue 1"):
            sch.submit([col.seq(2, _sampler(rt, [3], opts, 2))])
    finally:
        sch.close()


def test_a_pool_bounds_its_queue_over_all_schedulers(rt) -> None:
    pool = SchedulerPool(rt, engines=2, slots=2, max_queue=1)
    opts = sampling_options(rt.generation_config, max_new_tokens=10_000)
    col = _Collect()
    try:
        # One row on each scheduler, then one sequence may wait (on either); the next is refused.
        pool.submit([col.seq(k, _sampler(rt, [1, 2], opts, k)) for k in range(2)])
        pool.submit([col.seq(2, _sampler(rt, [3], opts, 2))])
        with pytest.raises(QueueFull, match="--parallel 2, --max-queue 1"):
            pool.submit([_Collect().seq(3, _sampler(rt, [4], opts, 3))])
        assert [s.slots for s in pool.schedulers] == [1, 1]
    finally:
        pool.close()
    assert col.done.wait(20)  # closing ends every sequence, decoding or waiting
    assert set(col.reasons) == {0, 1, 2}


def test_one_thread_or_a_runtime_without_the_decode_graph_gets_one_scheduler(rt, tiny_checkpoint) -> None:
    pytest.importorskip("torch")
    sch = open_scheduler(rt, slots=4, threads=1)
    try:
        assert isinstance(sch, Scheduler) and sch.engines == 1
    finally:
        sch.close()
    trt = open_runtime("torch", tiny_checkpoint)
    sch = open_scheduler(trt, slots=4, threads=2)
    try:
        assert isinstance(sch, Scheduler) and not sch.batched
    finally:
        sch.close()
    with pytest.raises(GptsError, match="engines: expected 1..2"):
        SchedulerPool(rt, engines=3, slots=2)


def test_cancelled_sequence_stops_and_frees_its_row(rt) -> None:
    sch = Scheduler(rt, slots=1, max_queue=4)
    opts = sampling_options(rt.generation_config, max_new_tokens=10_000)
    col = _Collect()
    started = threading.Event()
    try:
        seq = col.seq(0, _sampler(rt, [1, 2], opts, 0))
        seq.on_token = lambda ev: (col.tokens[0].append(ev.token), started.set())
        sch.submit([seq])
        assert started.wait(20)
        seq.cancel()
        assert col.done.wait(20)
        assert len(col.tokens[0]) < 10_000
        assert sch.load()["cancelled"] == 1
    finally:
        sch.close()


def test_bad_scheduler_settings_are_clear_errors(rt) -> None:
    with pytest.raises(GptsError, match="--parallel"):
        Scheduler(rt, slots=0)
    with pytest.raises(GptsError, match="--parallel: expected 1..256"):
        Scheduler(rt, slots=10_000)
    with pytest.raises(GptsError, match="--max-queue"):
        Scheduler(rt, max_queue=-1)


def test_torch_runtime_is_scheduled_per_row_with_the_same_tokens(tiny_checkpoint) -> None:
    pytest.importorskip("torch")
    from gpts_edge.api import open_runtime

    trt = open_runtime("torch", tiny_checkpoint)
    opts = sampling_options(trt.generation_config, max_new_tokens=6)
    sch = Scheduler(trt, slots=3)
    try:
        assert not sch.batched
        col = _Collect()
        sch.submit([col.seq(k, _sampler(trt, [1 + k, 2, 3], opts, k)) for k in range(5)])
        assert col.done.wait(60)
    finally:
        sch.close()
    for k in range(5):
        assert col.tokens[k] == list(generate_ids(trt, [1 + k, 2, 3], opts, seed=k))
