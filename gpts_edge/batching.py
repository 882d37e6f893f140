"""Continuous batching: many sequences decoded together, one model step for all of them.

One scheduler thread owns the model. Sequences are submitted from any thread; between two steps
the scheduler admits waiting sequences into free rows (those joining together with prompts of one
length prefill in one run), drops finished or cancelled ones, then runs one batched decode step
for every active row and samples all rows with one ``sample_rows`` pass, each row with its own
``SequenceSampler`` state (options, history, seeded draws). A sequence therefore gets exactly
the tokens it would get alone: the batched graph computes each row independently (tested bit for
bit against batch-1 steps and prefills), and a row's token never depends on the other rows.

    submit() ─> pending ─> admit: prefill rows r.. ─> [decode all rows ─> sample all rows]* ─> retire

Backends: ``BatchedDecoder`` (ONNX decode graph, all rows in one run) when the model has a decode
graph; otherwise any Runtime's ``step`` per row (torch, GGUF, an ONNX export without the decode
graph): the same scheduling and tokens, without the batching speed-up.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gpts_edge.errors import GptsError
from gpts_edge.generation import Runtime
from gpts_edge.sampling import SequenceSampler, advance_rows

MAX_LOGPROBS = 5
# A scheduler's counters (``load()``, the server's /health): steps, prefill runs, tokens,
# cancelled sequences, the largest batch, and microseconds in prefills, model steps, the sampler
# and handing tokens over.
STAT_KEYS = ("steps", "prefills", "tokens", "cancelled", "max_batch")
STAT_KEYS += ("prefill_us", "decode_us", "sample_us", "deliver_us")
MAX_SLOTS = 256  # each row holds a full-context KV slot (~1 MB for GPT-S-1.4M)


class QueueFull(GptsError):
    """More sequences waiting than the scheduler accepts."""


@dataclass
class TokenEvent:
    """One sampled token; ``logprob``/``top`` only when the sequence asked for logprobs."""

    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


@dataclass(eq=False)
class Sequence:
    """A sequence to decode. Callbacks run on the scheduler thread and must not block."""

    sampler: SequenceSampler
    on_token: Callable[[TokenEvent], None]
    on_done: Callable[[str | None, Exception | None], None]  # ("stop" | "length", None) or (None, err)
    logprobs: int | None = None  # top-N alternatives per token (0..5); None: no logprobs
    # False: nobody reads the tokens before the end, so an engine process may send them all with
    # ``on_done`` (``on_token`` still runs for each, in order, before it) instead of one per step.
    stream: bool = True
    cancelled: bool = False
    finished: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    on_cancel: Callable[[], None] | None = None  # set by an engine that decodes elsewhere

    def cancel(self) -> None:
        """Stop generating (a disconnected client, a stop string found); ``on_done`` still runs."""
        if not self.cancelled:
            self.cancelled = True
            if self.on_cancel is not None and not self.finished:
                self.on_cancel()


class _PerRowBackend:
    """Rows stepped one at a time through a Runtime's ``step`` (any runtime)."""

    def __init__(self, runtime: Runtime, slots: int) -> None:
        self.rt = runtime
        self.caches: list[Any] = [None] * slots

    def prefill(self, row: int, ids: list[int]) -> np.ndarray:
        logits, self.caches[row] = self.rt.step(np.asarray(ids, dtype=np.int64), self.rt.new_cache())
        return logits

    def prefill_rows(self, first: int, prompts: list[list[int]]) -> np.ndarray:
        return np.stack([self.prefill(first + i, ids) for i, ids in enumerate(prompts)])

    def decode(self, tokens: list[int]) -> np.ndarray:
        out = []
        for row, tok in enumerate(tokens):
            logits, self.caches[row] = self.rt.step(np.asarray([tok], dtype=np.int64), self.caches[row])
            out.append(np.asarray(logits))
        return np.stack(out)

    def move(self, src: int, dst: int) -> None:
        self.caches[dst], self.caches[src] = self.caches[src], None


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def add_stats(total: dict[str, int], stats: dict[str, int]) -> None:
    """Counters of several schedulers as one: sums, but the largest batch is the largest."""
    for k, v in stats.items():
        total[k] = max(total.get(k, 0), v) if k == "max_batch" else total.get(k, 0) + v


def finish(seq: Sequence, reason: str | None, err: Exception | None = None) -> None:
    """End ``seq`` once: mark it finished and call its ``on_done`` (whatever schedules it)."""
    if seq.finished:
        return
    seq.finished = True
    with contextlib.suppress(Exception):  # a callback's failure must not stop the other sequences
        seq.on_done(reason, err)


def check_sizes(slots: int, max_queue: int) -> None:
    if not 1 <= slots <= MAX_SLOTS:
        raise GptsError(f"--parallel: expected 1..{MAX_SLOTS}, found {slots}")
    if max_queue < 0:
        raise GptsError(f"--max-queue: expected >= 0, found {max_queue}")


def can_batch(runtime: Runtime) -> bool:
    """Whether ``runtime`` can decode many rows in one run: an ONNX export with its decode graph."""
    from gpts_edge.runtimes.onnx import OnnxRuntime

    if not isinstance(runtime, OnnxRuntime):
        return False
    from gpts_edge.runtimes.onnx_batch import decode_graph_path

    return decode_graph_path(runtime) is not None


class Scheduler:
    """Owns the model on one thread; decodes up to ``slots`` sequences per step.

    ``max_queue`` bounds the sequences waiting for a row (beyond that, ``submit`` raises QueueFull).
    ``batched``: None picks the batched ONNX decoder when the runtime has a decode graph.
    """

    def __init__(
        self,
        runtime: Runtime | None,
        *,
        slots: int = 16,
        max_queue: int = 64,
        threads: int = 1,
        batched: bool | None = None,
        after_step: Callable[[], None] | None = None,
        backend: Any = None,
    ) -> None:
        check_sizes(slots, max_queue)
        self.runtime = runtime
        self.slots, self.max_queue = slots, max_queue
        self.engines = 1
        self.backend: Any = backend  # given: a BatchedDecoder built elsewhere (an engine process's)
        if backend is None:
            if runtime is None:
                raise GptsError("a scheduler needs a runtime or a backend")
            if batched is not False and can_batch(runtime):
                from gpts_edge.runtimes.onnx_batch import BatchedDecoder

                self.backend = BatchedDecoder(runtime, slots, threads=threads)
            elif batched:
                raise GptsError(
                    "batched decoding needs an ONNX export with its decode graph (model.decode.onnx)"
                )
            else:
                self.backend = _PerRowBackend(runtime, slots)
        self.batched = not isinstance(self.backend, _PerRowBackend)
        self._cond = threading.Condition()
        self._pending: deque[Sequence] = deque()
        self._calls: deque[tuple[Callable[[], Any], Future]] = deque()
        self._active: list[Sequence] = []  # row r holds _active[r]
        self._stop = False
        self._after_step = after_step or (lambda: None)  # e.g. wake the requests that got tokens
        # Rows are sampled on a small pool when more than one thread is allowed (each row's sampler
        # is its own, so the order of work does not change any token).
        self._pool_size = max(1, threads)
        self._pool = ThreadPoolExecutor(self._pool_size, "gpts-edge-sample") if threads > 1 else None
        self.stats = dict.fromkeys(STAT_KEYS, 0)
        self._thread = threading.Thread(target=self._run, name="gpts-edge-scheduler", daemon=True)
        self._thread.start()

    # --- any thread ----------------------------------------------------------------------------------

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue sequences together (all or none)."""
        with self._cond:
            if self._stop:
                raise GptsError("the scheduler is shut down")
            free = self.slots - len(self._active)
            waiting = len(self._pending) + len(seqs) - max(free, 0)
            if waiting > self.max_queue:
                raise QueueFull(
                    f"server busy: {len(self._active)} sequences decoding, {len(self._pending)} waiting "
                    f"(--parallel {self.slots}, --max-queue {self.max_queue})"
                )
            self._pending.extend(seqs)
            self._cond.notify()

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` on the scheduler thread between two steps (the model has one owner)."""
        fut: Future = Future()
        with self._cond:
            self._calls.append((fn, fut))
            self._cond.notify()
        return fut

    def load(self) -> dict[str, int]:
        with self._cond:
            return {"active": len(self._active), "pending": len(self._pending), **self.stats}

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=10)
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    # --- scheduler thread ----------------------------------------------------------------------------

    def _finish(self, seq: Sequence, reason: str | None, err: Exception | None = None) -> None:
        if not seq.finished and seq.cancelled and err is None:
            self.stats["cancelled"] += 1
        finish(seq, reason, err)

    @staticmethod
    def _sample(seqs: list[Sequence], logits: np.ndarray) -> list[TokenEvent]:
        """The rows' next tokens, one ``sample_rows`` pass for all of them (touches only these
        sequences: safe on a pool thread). ``logits``: (rows, vocab), row i for ``seqs[i]``."""
        toks = advance_rows([seq.sampler for seq in seqs], logits)
        events = [TokenEvent(tok) for tok in toks]
        for i, seq in enumerate(seqs):
            if seq.logprobs is not None:  # only when asked: a log-softmax over the vocabulary
                lp = _log_softmax(logits[i])
                events[i].logprob = float(lp[toks[i]])
                if seq.logprobs:
                    top = np.argsort(-lp, kind="stable")[: seq.logprobs]
                    events[i].top = [(int(t), float(lp[t])) for t in top]
        return events

    def _deliver(self, seq: Sequence, event: TokenEvent) -> None:
        self.stats["tokens"] += 1
        try:
            seq.on_token(event)
        except Exception as exc:
            seq.cancelled = True
            self._finish(seq, None, exc)
            return
        s = seq.sampler
        if s.done:
            eos = s.opts.stop_at_eos and event.token == s.eos_id
            self._finish(seq, "stop" if eos else "length")

    def _sample_rows(self, seqs: list[Sequence], logits: np.ndarray) -> list[TokenEvent]:
        """Sample every row; with several threads, contiguous slices of the batch at once (numpy
        releases the GIL in its loops). A row's token does not depend on which slice it is in."""
        k = min(self._pool_size, len(seqs))
        if self._pool is None or k < 2:
            return self._sample(seqs, logits)
        cuts = [len(seqs) * i // k for i in range(k + 1)]
        parts = self._pool.map(
            lambda i: self._sample(seqs[cuts[i] : cuts[i + 1]], logits[cuts[i] : cuts[i + 1]]), range(k)
        )
        return [event for part in parts for event in part]

    def _retire(self) -> None:
        """Drop finished and cancelled rows; the last active row moves into each freed row."""
        row = 0
        while row < len(self._active):
            seq = self._active[row]
            if seq.cancelled or seq.finished or seq.sampler.done:
                if not seq.finished:
                    self._finish(seq, "stop")
                last = len(self._active) - 1
                if row != last:
                    self.backend.move(last, row)
                    self._active[row] = self._active[last]
                self._active.pop()
            else:
                row += 1

    @staticmethod
    def _run_calls(calls: list[tuple[Callable[[], Any], Future]]) -> None:
        for fn, fut in calls:
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except Exception as exc:  # handed to the caller, who turns it into a response
                    fut.set_exception(exc)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._stop or self._pending or self._calls or self._active):
                    self._cond.wait()
                if self._stop:
                    pending, self._pending = list(self._pending), deque()
                    break
                calls = list(self._calls)
                self._calls.clear()
                joining = []
                while self._pending and len(self._active) + len(joining) < self.slots:
                    seq = self._pending.popleft()
                    if seq.cancelled or seq.sampler.done:
                        self._finish(seq, "stop" if seq.cancelled else "length")
                        continue
                    joining.append(seq)
                # Prompts of one length side by side: they prefill in one run.
                self._active.extend(sorted(joining, key=lambda s: len(s.sampler.feed)))
            self._run_calls(calls)
            self._step()
            self._after_step()
        for seq in pending + self._active:
            self._finish(seq, None, GptsError("the server is shutting down"))
        self._after_step()

    def _prefill(self) -> None:
        """Rows that start (new, or sliding past the context) read their tokens first; adjacent
        rows with as many tokens to read share one run. A prompt longer than the context slides
        right after its first token, so this repeats until no row is left to start."""
        while True:
            runs: list[list[int]] = []  # [first row, rows]
            for row, seq in enumerate(self._active):
                s = seq.sampler
                if not s.reset or seq.finished or s.done:
                    continue
                last = runs[-1] if runs else None
                if (
                    last
                    and last[0] + last[1] == row
                    and len(self._active[last[0]].sampler.feed) == len(s.feed)
                ):
                    last[1] += 1
                else:
                    runs.append([row, 1])
            if not runs:
                return
            for first, n in runs:
                seqs = self._active[first : first + n]
                t = time.perf_counter()
                logits = self.backend.prefill_rows(first, [seq.sampler.feed for seq in seqs])
                self.stats["prefill_us"] += int((time.perf_counter() - t) * 1e6)
                self.stats["prefills"] += 1
                for seq, event in zip(seqs, self._sample_rows(seqs, logits), strict=True):
                    self._deliver(seq, event)

    def _step(self) -> None:
        self._retire()
        try:
            self._prefill()
            self._retire()
            if not self._active:
                return
            t0 = time.perf_counter()
            logits = self.backend.decode([seq.sampler.feed[0] for seq in self._active])
            t1 = time.perf_counter()
            self.stats["steps"] += 1
            self.stats["max_batch"] = max(self.stats["max_batch"], len(self._active))
            live = [row for row, seq in enumerate(self._active) if not seq.finished]
            seqs = [self._active[row] for row in live]
            events = self._sample_rows(seqs, logits if len(live) == len(logits) else logits[live])
            t2 = time.perf_counter()
            for seq, event in zip(seqs, events, strict=True):
                self._deliver(seq, event)
            self._retire()
            # Where a decode step's time goes (microseconds, summed): the model, the sampler, the rest.
            self.stats["decode_us"] += int((t1 - t0) * 1e6)
            self.stats["sample_us"] += int((t2 - t1) * 1e6)
            self.stats["deliver_us"] += int((time.perf_counter() - t2) * 1e6)
        except Exception as exc:  # a model failure ends the sequences in flight, not the server
            err = exc if isinstance(exc, GptsError) else GptsError(f"model step failed: {exc}")
            for seq in self._active:
                seq.cancelled = True
                self._finish(seq, None, err)
            self._retire()


class RowPool:
    """What the pools of schedulers share: ``engines`` of them, the ``slots`` rows split among
    them, and one ``max_queue`` bound over all of them (as with one scheduler)."""

    batched = True

    def __init__(
        self,
        runtime: Runtime,
        *,
        engines: int,
        slots: int = 16,
        max_queue: int = 64,
        after_step: Callable[[], None] | None = None,
    ) -> None:
        check_sizes(slots, max_queue)
        if not 1 <= engines <= slots:
            raise GptsError(f"engines: expected 1..{slots} (--parallel), found {engines}")
        self.runtime = runtime
        self.slots, self.max_queue, self.engines = slots, max_queue, engines
        self.after_step = after_step or (lambda: None)
        # The rows split as evenly as they go: 16 rows on 3 engines are 6, 5 and 5.
        self.shares = [slots // engines + (i < slots % engines) for i in range(engines)]

    def check_room(self, active: int, pending: int, free: int, joining: int) -> None:
        """Raise QueueFull when ``joining`` more sequences would leave over ``max_queue`` waiting."""
        if pending + joining - free > self.max_queue:
            raise QueueFull(
                f"server busy: {active} sequences decoding, {pending} waiting "
                f"(--parallel {self.slots}, --max-queue {self.max_queue})"
            )


class SchedulerPool(RowPool):
    """``engines`` schedulers side by side, each with its own thread, its own share of the rows
    (KV slots) and its own one-thread session of the decode graph; a sequence stays on the one it
    was given (the least loaded) from start to end.

    Why: one batched step of this small model does not use a second core well (onnxruntime's
    threads split matrices of a few hundred columns, and the sampler runs between the steps). One
    scheduler per core keeps every core stepping its own batch, and while one scheduler is in the
    model (onnxruntime runs without the GIL) another samples. docs/serve.md has the A/B. Tokens do
    not depend on the scheduler a sequence lands on: every row is computed and sampled on its own.
    The same interface as ``Scheduler``. (``gpts_edge.engines.EngineProcesses`` does the same with
    processes, which the interpreter lock does not hold back; this pool is ``serve --in-process``.)
    """

    def __init__(self, runtime: Runtime, **pool: Any) -> None:
        super().__init__(runtime, **pool)
        self.schedulers: list[Scheduler] = []
        try:
            for share in self.shares:
                self.schedulers.append(
                    Scheduler(
                        runtime,
                        slots=share,
                        max_queue=self.max_queue,
                        threads=1,
                        batched=True,
                        after_step=self.after_step,
                    )
                )
        except BaseException:
            self.close()
            raise
        self._lock = threading.Lock()

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue sequences together (all or none) on the least loaded scheduler; the queue bound
        is over the whole pool, as with one scheduler."""
        with self._lock:
            loads = [s.load() for s in self.schedulers]
            active = sum(x["active"] for x in loads)
            pending = sum(x["pending"] for x in loads)
            self.check_room(active, pending, max(self.slots - active, 0), len(seqs))
            # Least loaded relative to its rows; ties go to the first.
            best = min(
                range(len(loads)),
                key=lambda i: (loads[i]["active"] + loads[i]["pending"]) / self.schedulers[i].slots,
            )
            self.schedulers[best].submit(seqs)

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` on the first scheduler's thread (the runtime's own session has one owner)."""
        return self.schedulers[0].call(fn)

    def load(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for s in self.schedulers:
            add_stats(total, s.load())
        return total

    def close(self) -> None:
        for s in self.schedulers:
            s.close()
