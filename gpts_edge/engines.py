"""Engine processes: the server's batched decoding in processes of their own.

Why: a scheduler's sampler and bookkeeping are Python, and Python threads take turns on one
interpreter lock. Two schedulers in one process (``SchedulerPool``) therefore spend much of their
time waiting for each other and for the HTTP event loop, and on a 2-core machine 16 clients got
about 3.3x one stream's tokens/s instead of the 4x asked for (docs/serve.md, run 10). Each engine
process here owns one ``Scheduler`` (its own onnxruntime session of the decode graph, one thread,
its share of the rows) and its own interpreter; the HTTP process only queues sequences and
reads their tokens.

    HTTP process                                       engine process (one per --threads)
    submit ─> pick the least loaded engine ─ commands ─> Scheduler: admit, decode, sample
    callbacks (on_token, on_done) <────────── events ──  one message per step (streams), or one
                                                          per sequence at its end (the others)

A sequence is rebuilt in the engine from what determines its tokens (the kept prompt, the options,
the seed), so it gets the tokens it gets in-process or alone (tested). A cancel (a client gone, a
stop string found) is one message; the engine drops the row at its next step. An engine that dies
ends its sequences with an error and is replaced; the others go on. Engines are ``python -m gpts_edge.engines`` child
processes (no fork of a threaded server) and leave when their command pipe closes, so none
outlives the server.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import count
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from gpts_edge.batching import (
    STAT_KEYS,
    RowPool,
    Scheduler,
    SchedulerPool,
    Sequence,
    TokenEvent,
    add_stats,
    can_batch,
    finish,
)
from gpts_edge.errors import GptsError
from gpts_edge.generation import Runtime

START_TIMEOUT_S = 180.0  # an engine imports onnxruntime and opens the graph (seconds on a Pi)
STATS_EVERY_S = 0.1  # engines send their counters at least this often while busy
# Streamed tokens after a sequence's first wait up to this long to travel with the next steps'
# (a sequence's first token and its end go at once), and reach the client as one event. One
# message and one event per token cost a stream a quarter of its tokens/s (pipe writes, wake-ups,
# socket writes); 10 ms bursts are under a screen's frame time at 60 Hz.
STREAM_EVERY_S = 0.01


def usable_cores() -> int:
    """The cores this process may run on (a container's or ``taskset``'s set, not the machine's)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # macOS and Windows have no affinity call
        return os.cpu_count() or 1


# --- the engine process --------------------------------------------------------------------------------


def _engine_main(commands: Any, events: Any) -> None:
    """An engine process: one Scheduler over its own session; commands in, events out. The first
    command is ("init", model config, batched decode graph, rows)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's to handle; it closes us
    from gpts_edge.runtimes.onnx_batch import BatchedDecoder
    from gpts_edge.sampling import SequenceSampler

    outbox: list[tuple] = []
    last_stats, last_sent = [0.0], [0.0]
    urgent = [False]  # the outbox holds a first token or an end: it goes after this step
    live: dict[int, Sequence] = {}

    def flush() -> None:  # on the scheduler thread, after each step: one message for the steps
        now = time.monotonic()
        stats_due = now - last_stats[0] >= STATS_EVERY_S
        if not (stats_due or (outbox and (urgent[0] or now - last_sent[0] >= STREAM_EVERY_S))):
            return
        done = any(item[0] == "d" for item in outbox)
        stats = sch.load() if done or stats_due else None
        if stats is not None:
            last_stats[0] = now
        items = outbox[:]
        outbox.clear()
        urgent[0], last_sent[0] = False, now
        with contextlib.suppress(OSError):  # the server is gone; the command pipe's EOF ends us
            events.send(("events", items, stats))

    try:
        _, cfg, graph, slots = commands.recv()
        # Only the batched session: no batch-1 session, tokenizer or onnx package in an engine.
        decoder = BatchedDecoder.from_graph(cfg, graph, slots, threads=1)
        del graph
        sch = Scheduler(None, slots=slots, max_queue=1 << 30, backend=decoder, after_step=flush)
    except (EOFError, OSError):
        return  # the server went away while we started
    except Exception as exc:  # reported to the server, which refuses to start with it
        events.send(("fatal", str(exc) if isinstance(exc, GptsError) else f"{type(exc).__name__}: {exc}"))
        return
    events.send(("ready", None))

    def make(spec: tuple) -> Sequence:
        sid, prompt, opts, seed, eos_id, logprobs, stream = spec
        held: list[tuple] = []

        def on_token(ev: TokenEvent) -> None:
            item = (ev.token, ev.logprob, ev.top)
            if stream:
                outbox.append(("t", sid, item))
                urgent[0] = urgent[0] or sampler.generated == 1  # the time to a first token
            else:
                held.append(item)

        def on_done(reason: str | None, err: Exception | None) -> None:
            live.pop(sid, None)
            outbox.append(("d", sid, reason, None if err is None else str(err), held))
            urgent[0] = True

        sampler = SequenceSampler(
            prompt,
            opts,
            context_length=cfg.context_length,
            vocab_size=cfg.vocab_size,
            eos_id=eos_id,
            seed=seed,
        )
        seq = Sequence(sampler, on_token=on_token, on_done=on_done, logprobs=logprobs, stream=stream)
        live[sid] = seq
        return seq

    try:
        while True:
            try:
                msg = commands.recv()
            except (EOFError, OSError):
                break
            if msg[0] == "submit":
                sch.submit([make(spec) for spec in msg[1]])
            elif msg[0] == "cancel":
                for sid in msg[1]:
                    seq = live.get(sid)
                    if seq is not None:
                        seq.cancel()
            elif msg[0] == "close":
                break
    finally:
        sch.close()


# --- the server's side ---------------------------------------------------------------------------------


def _graph_for_engines(runtime: Runtime) -> bytes:
    """The decode graph with a symbolic batch, as every engine loads it."""
    from gpts_edge.runtimes.onnx_batch import batched_graph

    return batched_graph(runtime)[1]  # type: ignore[arg-type]


class _Engine:
    """One engine process as the server sees it: its pipes, its sequences, its last counters.

    Started as ``python -m gpts_edge.engines`` with two pipes, not through multiprocessing: its
    ``spawn`` re-imports the parent's main module, which breaks (or re-runs) a user's script that
    opens a server without an ``if __name__ == "__main__"`` guard, and ``fork`` copies a threaded
    server.
    """

    def __init__(self, slots: int, index: int) -> None:
        self.slots, self.index = slots, index
        cmd_read, cmd_write = os.pipe()
        evt_read, evt_write = os.pipe()
        env = dict(os.environ)
        # The child imports this very package, wherever it was imported from here.
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        try:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gpts_edge.engines",
                    str(cmd_read),
                    str(evt_write),
                ],
                pass_fds=(cmd_read, evt_write),
                stdin=subprocess.DEVNULL,
                env=env,
            )
        finally:
            os.close(cmd_read)
            os.close(evt_write)
        self.commands = Connection(cmd_write, readable=False)
        self.events = Connection(evt_read, writable=False)
        self.send_lock = threading.Lock()
        self.seqs: dict[int, Sequence] = {}  # submitted and not yet done
        self.stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)  # until its first report
        self.dead: str | None = None  # why it stopped, once it has

    @property
    def active(self) -> int:  # its sequences in rows (callers hold the pool's lock)
        return min(len(self.seqs), self.slots)

    @property
    def pending(self) -> int:  # its sequences waiting for a row
        return max(0, len(self.seqs) - self.slots)

    def send(self, msg: tuple) -> None:
        with self.send_lock:
            self.commands.send(msg)

    def begin(self, init: tuple) -> None:
        """Hand the engine its model (megabytes: the pipe takes them as the engine reads, once it
        has imported onnxruntime), on a thread of its own so that engines start side by side and
        one that never reads cannot hang the server: ``wait_ready`` times out instead."""

        def send() -> None:
            with contextlib.suppress(OSError, ValueError):  # one that died: wait_ready reports it
                self.send(("init", *init, self.slots))

        threading.Thread(target=send, name=f"gpts-edge-engine-{self.index}-init", daemon=True).start()

    def wait_ready(self, deadline: float) -> None:
        if not self.events.poll(max(0.0, deadline - time.monotonic())):
            raise GptsError(f"engine process {self.index} did not start within {START_TIMEOUT_S:.0f} s")
        try:
            kind, detail = self.events.recv()
        except (EOFError, OSError):
            raise GptsError(
                f"engine process {self.index} exited while starting (exit code {self.process.wait()})"
            ) from None
        if kind != "ready":
            raise GptsError(f"engine process {self.index}: {detail}")

    def stop(self) -> None:
        if self.send_lock.acquire(timeout=1):  # not while its model is still being handed over
            try:
                with contextlib.suppress(OSError, ValueError):
                    self.commands.send(("close",))
            finally:
                self.send_lock.release()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
        for conn in (self.commands, self.events):
            with contextlib.suppress(OSError):
                conn.close()


class EngineProcesses(RowPool):
    """``engines`` engine processes, each with ``slots / engines`` rows; the Scheduler interface
    (``submit``, ``call``, ``load``, ``close``). A request's sequences go to the least loaded engine
    and stay there; the ``max_queue`` bound is over all of them, as with one scheduler.

    ``call(fn)`` runs ``fn`` on a thread of this process that owns ``runtime`` (the engines have
    their own sessions), e.g. scoring a prompt for ``echo``.
    """

    def __init__(self, runtime: Runtime, *, restarts: int = 3, **pool: Any) -> None:
        super().__init__(runtime, **pool)
        if not can_batch(runtime):
            raise GptsError("engine processes need an ONNX export with its decode graph")
        # Built once here and handed to every engine (and to a replacement).
        self._init = (runtime.config, _graph_for_engines(runtime))
        self._lock = threading.Lock()  # the engines' sequence tables and the queue bound
        self._ids = count()
        self._closed = False
        self._owner = ThreadPoolExecutor(1, "gpts-edge-runtime")  # call(): the runtime's one owner
        # An engine that dies (killed for memory, say) is replaced, at most ``restarts`` times per
        # engine: a fault that kills every new engine must not become a loop of restarts.
        self._restarts_left = [restarts] * self.engines
        self._gone_stats: dict[str, int] = {}  # counters of replaced engines, so totals never drop
        self._threads: list[threading.Thread] = []
        self._engines: list[_Engine] = []
        try:
            for i, share in enumerate(self.shares):
                self._engines.append(_Engine(share, i))
            for engine in self._engines:
                engine.begin(self._init)
            deadline = time.monotonic() + START_TIMEOUT_S
            for engine in self._engines:
                engine.wait_ready(deadline)
        except BaseException:
            self.close()
            raise
        for engine in self._engines:
            self._start_reader(engine)

    def _start_reader(self, engine: _Engine) -> None:
        name = f"gpts-edge-engine-{engine.index}-events"
        t = threading.Thread(target=self._read, args=(engine,), name=name, daemon=True)
        self._threads.append(t)
        t.start()

    # --- any thread ----------------------------------------------------------------------------------

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue sequences together (all or none) on the least loaded engine."""
        specs = []
        for seq in seqs:
            s = seq.sampler
            if s.seed is None:
                raise GptsError("engine processes need seeded samplers (custom draws cannot travel)")
            specs.append((s.prompt, s.opts, s.seed, s.eos_id, seq.logprobs, seq.stream))
        with self._lock:
            if self._closed:
                raise GptsError("the scheduler is shut down")
            alive = [e for e in self._engines if e.dead is None]
            if not alive:
                raise GptsError("every engine process has stopped; restart the server")
            self.check_room(
                sum(e.active for e in alive),
                sum(e.pending for e in alive),
                sum(e.slots - e.active for e in alive),
                len(seqs),
            )
            engine = min(alive, key=lambda e: len(e.seqs) / e.slots)  # ties: the first
            sids = [next(self._ids) for _ in seqs]
            for sid, seq in zip(sids, seqs, strict=True):
                engine.seqs[sid] = seq
                seq.on_cancel = self._canceller(engine, sid)
            try:
                engine.send(("submit", [(sid, *spec) for sid, spec in zip(sids, specs, strict=True)]))
            except (OSError, ValueError) as exc:
                for sid in sids:
                    engine.seqs.pop(sid, None)
                raise GptsError(f"engine process {engine.index} is gone ({type(exc).__name__})") from None

    @staticmethod
    def _canceller(engine: _Engine, sid: int) -> Callable[[], None]:
        def cancel() -> None:
            with contextlib.suppress(OSError, ValueError):  # a dead engine has ended it already
                engine.send(("cancel", [sid]))

        return cancel

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` on the thread that owns the runtime in this process."""
        return self._owner.submit(fn)

    @property
    def pids(self) -> list[int]:
        return [e.process.pid for e in self._engines]

    def loads(self) -> list[dict[str, int]]:
        """Each engine's counters (as of its last message) and its active and waiting sequences."""
        with self._lock:
            return [
                {
                    **e.stats,
                    "active": e.active,
                    "pending": e.pending,
                    "engines_alive": int(e.dead is None),
                }
                for e in self._engines
            ]

    def load(self) -> dict[str, int]:
        total: dict[str, int] = {"engines": self.engines}
        for stats in [*self.loads(), self._gone_stats]:
            add_stats(total, stats)
        return total

    def close(self) -> None:
        with self._lock:
            self._closed = True
        for engine in list(self._engines):
            engine.stop()
        for t in list(self._threads):
            if t is not threading.current_thread():
                t.join(timeout=10)
        for engine in list(self._engines):  # one a restart may have put in meanwhile
            engine.stop()
        self._owner.shutdown(wait=False)

    # --- one reader thread per engine -------------------------------------------------------------------

    def _read(self, engine: _Engine) -> None:
        while True:
            try:
                msg = engine.events.recv()
            except (EOFError, OSError):
                break
            if msg[0] != "events":
                continue
            _, items, stats = msg
            if stats is not None:  # first: a sequence's end may wake someone who reads load()
                engine.stats = stats
            for item in items:
                self._dispatch(engine, item)
            self.after_step()
        # The pipe closed: a shutdown, or the engine died. Either way its sequences end here.
        if self._closed:
            why = "the server is shutting down"
        else:
            try:  # its pipe closes as it dies; its exit code may take a moment more
                code: int | None = engine.process.wait(timeout=2)
            except subprocess.TimeoutExpired:
                code = None
            why = f"engine process {engine.index} stopped (exit code {code})"
        with self._lock:
            engine.dead = why
            left, engine.seqs = list(engine.seqs.values()), {}
            restart = not self._closed and self._restarts_left[engine.index] > 0
            if restart:
                self._restarts_left[engine.index] -= 1
        for seq in left:
            finish(seq, None, GptsError(why))
        self.after_step()
        if restart:
            self._restart(engine)

    def _restart(self, old: _Engine) -> None:
        """A new engine in a dead one's place (on the dead one's reader thread)."""
        try:
            new = _Engine(old.slots, old.index)
        except OSError:
            return
        new.begin(self._init)
        try:
            new.wait_ready(time.monotonic() + START_TIMEOUT_S)
        except GptsError as exc:
            old.dead += f"; its replacement did not start ({exc})"
            new.stop()
            return
        with self._lock:
            if self._closed:
                replaced = False
            else:
                add_stats(self._gone_stats, old.stats)
                self._engines[old.index] = new
                replaced = True
        if not replaced:
            new.stop()
            return
        old.stop()  # its pipes
        self._start_reader(new)

    def _dispatch(self, engine: _Engine, item: tuple) -> None:
        if item[0] == "t":
            seq = engine.seqs.get(item[1])
            if seq is not None:
                _token(seq, item[2])
            return
        _, sid, reason, err, held = item
        with self._lock:
            seq = engine.seqs.pop(sid, None)
        if seq is None:
            return
        for tok in held:
            if not _token(seq, tok):
                return
        finish(seq, reason, None if err is None else GptsError(err))


def _token(seq: Sequence, item: tuple) -> bool:
    """Hand one token to the sequence's callback; False (and the sequence ended) if it raised."""
    if seq.finished:
        return False
    try:
        seq.on_token(TokenEvent(*item))
    except Exception as exc:
        seq.cancel()
        finish(seq, None, exc)
        return False
    return True


def open_scheduler(
    runtime: Runtime,
    *,
    slots: int = 16,
    max_queue: int = 64,
    threads: int = 1,
    after_step: Callable[[], None] | None = None,
    processes: bool = False,
) -> Any:
    """The server's decoding. With a runtime that batches: ``processes`` runs ``threads`` engine
    processes (``gpts_edge.engines.EngineProcesses``, at most one per row); otherwise ``threads``
    > 1 runs one scheduler thread per thread in this process (``SchedulerPool``). Else one
    ``Scheduler`` whose model runs on ``threads`` threads (runtimes stepped row by row). Engines
    are started with inherited pipes, which Windows lacks: there the schedulers run on threads."""
    if can_batch(runtime) and processes and os.name != "nt":
        return EngineProcesses(
            runtime, engines=min(threads, slots), slots=slots, max_queue=max_queue, after_step=after_step
        )
    if threads > 1 and slots > 1 and can_batch(runtime):
        return SchedulerPool(
            runtime, engines=min(threads, slots), slots=slots, max_queue=max_queue, after_step=after_step
        )
    return Scheduler(runtime, slots=slots, max_queue=max_queue, threads=threads, after_step=after_step)


if __name__ == "__main__":  # python -m gpts_edge.engines CMD_FD EVT_FD (see _Engine)
    _engine_main(Connection(int(sys.argv[1]), writable=False), Connection(int(sys.argv[2]), readable=False))
