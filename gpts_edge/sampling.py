"""The one sampler and the one generation loop, numpy only. Every runtime (torch, ONNX, GGUF,
and the JavaScript port, pinned by golden vectors) goes through these.

A runtime supplies only ``step(tokens, cache) -> (logits, cache)``: ``tokens`` is an int64 array
of the new token ids, ``logits`` the float scores of the next token after the last of them.

Order of operations in ``sample`` (fixed; the JS port follows it exactly), all in float64:
  1. repetition penalty on every token id in ``history`` (HF rule: positive logits / r,
     negative logits * r)
  2. no-repeat-ngram: ban each token that would complete an n-gram already in ``history``;
     if nothing is left, return the raw argmax of ``logits``
  3. greedy (temperature == 0): argmax, lowest id wins ties
  4. divide by temperature
  5. top-k: keep the k largest (ties at the boundary are kept)
  6. softmax
  7. top-p: sort by probability (descending, stable, so lower id first on ties), keep the
     shortest prefix whose mass reaches p (at least one token)
  8. draw: with u in [0, 1), the first kept token (in id order) whose cumulative mass exceeds
     u * total kept mass

``sample_rows`` is the implementation: it samples a batch of rows (each with its own options,
history and draw) with one pass of each step over the rows that take it; ``sample`` and
``SequenceSampler.advance`` call it with one row, the server's scheduler with a batch. A row's
token does not depend on the other rows: every step is an element-wise operation or a reduction
within the row, with sums added in the same order as for one row alone.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from gpts_edge.constants import DEFAULT_GENERATION as _D
from gpts_edge.errors import GptsError

StepFn = Callable[[np.ndarray, Any], tuple[np.ndarray, Any]]


@dataclass(frozen=True)
class SamplingOptions:
    temperature: float = _D["temperature"]
    top_k: int = _D["top_k"]  # 0: off
    top_p: float = _D["top_p"]
    repetition_penalty: float = _D["repetition_penalty"]
    no_repeat_ngram_size: int = _D["no_repeat_ngram_size"]  # 0: off
    max_new_tokens: int = _D["max_new_tokens"]
    stop_at_eos: bool = True

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise GptsError(f"--temperature: expected >= 0, found {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise GptsError(f"--top-p: expected a value in (0, 1], found {self.top_p}")
        if self.top_k < 0:
            raise GptsError(f"--top-k: expected >= 0 (0 = off), found {self.top_k}")
        if not self.repetition_penalty > 0:
            raise GptsError(f"--repetition-penalty: expected > 0, found {self.repetition_penalty}")
        if self.no_repeat_ngram_size < 0:
            raise GptsError(f"--no-repeat-ngram-size: expected >= 0, found {self.no_repeat_ngram_size}")
        if self.max_new_tokens < 0:
            raise GptsError(f"--max-new-tokens: expected >= 0, found {self.max_new_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def banned_ngram_tokens(history: Sequence[int], n: int) -> set[int]:
    """Tokens that would complete an n-gram already present in ``history``."""
    if n <= 0 or len(history) < n:
        return set()
    h = np.asarray(history, dtype=np.int64)
    windows = len(h) - n + 1
    # Window i (history[i : i + n - 1]) matches the last n - 1 tokens: history[i + n - 1] is banned.
    match = np.ones(windows, dtype=bool)
    for j in range(n - 1):
        match &= h[j : j + windows] == h[len(h) - n + 1 + j]
    return set(h[n - 1 :][match].tolist())


class SampleRow(NamedTuple):
    """What the sampler needs of one sequence for one draw."""

    opts: SamplingOptions
    seen: np.ndarray  # the distinct ids of the history (int64): the repetition penalty's ids
    banned: Collection[int]  # ids the no-repeat-ngram rule bans after this history
    u: float  # the uniform draw in [0, 1)


def sample(logits: np.ndarray, opts: SamplingOptions, history: Sequence[int], u: float) -> int:
    """One token id from ``logits`` (1-D) given the ids so far and a uniform draw ``u``:
    ``sample_rows`` with one row."""
    seen = np.unique(np.asarray(history, dtype=np.int64))
    row = SampleRow(opts, seen, banned_ngram_tokens(history, opts.no_repeat_ngram_size), u)
    return sample_rows(np.asarray(logits)[None], [row])[0]


# Rows go through the passes over the vocabulary in blocks of 8: a block's float64 array
# (8 x 4,096 x 8 B = 256 KB) stays in the core's L2 cache. With top-p done row by row, 8 measured
# 11 % less time per row than 4 at 16 rows (defaults; 20 % greedy) and level with 16.
_BLOCK_ROWS = 8


def sample_rows(logits: np.ndarray, rows: Sequence[SampleRow]) -> list[int]:
    """The sampler: one token id for each row of ``logits`` (rows, vocab), each row with its own
    options, history and draw. Each step of the documented order runs once over all the rows that
    take it; every row's numbers are those it gets alone (the same element-wise operations, the
    same per-row reductions, sums in the same order), so a row's token never depends on the others.
    """
    logits = np.asarray(logits)
    n_rows, vocab = logits.shape
    if n_rows > _BLOCK_ROWS:
        return [
            tok
            for s in range(0, n_rows, _BLOCK_ROWS)
            for tok in sample_rows(logits[s : s + _BLOCK_ROWS], rows[s : s + _BLOCK_ROWS])
        ]
    x = logits.astype(np.float64)  # a copy: the penalties write into it
    out: list[int | None] = [None] * n_rows
    # 1. Repetition penalty. Each id appears once in ``seen``; a repeated id would read the same
    # original value and write the same result anyway.
    pen = [i for i, r in enumerate(rows) if r.opts.repetition_penalty != 1.0 and len(r.seen)]
    if pen:
        ids = np.concatenate([rows[i].seen for i in pen])
        counts = [len(rows[i].seen) for i in pen]
        rr = np.repeat(pen, counts)
        rp = np.repeat([rows[i].opts.repetition_penalty for i in pen], counts)
        vals = x[rr, ids]
        x[rr, ids] = np.where(vals > 0, vals / rp, vals * rp)
    # 2. No-repeat-ngram bans.
    ban = [i for i, r in enumerate(rows) if r.banned]
    if ban:
        lists = [list(rows[i].banned) for i in ban]
        x[np.repeat(ban, [len(b) for b in lists]), np.concatenate(lists)] = -np.inf
    # Everything banned (or non-finite): the raw argmax rather than fail. A finite maximum means
    # some entry is finite; only rows without one need the full check.
    largest = x.max(axis=1)
    for i in np.flatnonzero(~np.isfinite(largest)).tolist():
        if not np.isfinite(x[i]).any():
            out[i] = int(np.argmax(logits[i]))
    # 3. Greedy.
    greedy = [i for i, r in enumerate(rows) if out[i] is None and r.opts.temperature == 0]
    if greedy:
        for i, tok in zip(greedy, np.argmax(_take(x, greedy), axis=1).tolist(), strict=True):
            out[i] = tok
    todo = [i for i in range(n_rows) if out[i] is None]
    if todo:
        for i, tok in zip(todo, _draw(_take(x, todo), largest[todo], logits, rows, todo), strict=True):
            out[i] = tok
    return out  # type: ignore[return-value]


def _take(a: np.ndarray, rows: list[int]) -> np.ndarray:
    """Rows of ``a``: ``a`` itself (no copy) when they are all of them, in order."""
    return a if len(rows) == len(a) else a[rows]


def _draw(
    x: np.ndarray, largest: np.ndarray, logits: np.ndarray, rows: Sequence[SampleRow], todo: list[int]
) -> list[int]:
    """Steps 4-8 for the rows ``todo`` (``x``: their penalised logits, one row each; ``largest``:
    each row's maximum)."""
    opts = [rows[i].opts for i in todo]
    # 4. Temperature.
    temperature = np.array([o.temperature for o in opts])
    x /= temperature[:, None]
    # 5. Top-k, one partition per distinct k.
    vocab = x.shape[1]
    for k in {o.top_k for o in opts if 0 < o.top_k < vocab}:
        sel = [j for j, o in enumerate(opts) if o.top_k == k]
        sub = x[sel]
        kth = np.partition(sub, -k, axis=1)[:, -k]
        sub[sub < kth[:, None]] = -np.inf
        x[sel] = sub
    # 6. Softmax. A finite maximum means no +inf or NaN: exp(-inf - top) is exactly the 0 of a
    # masked entry. Other rows (e.g. a tiny temperature overflowed) use their finite entries only.
    # The largest of x / T is the largest x over T (rounding is monotonic; top-k keeps it): no
    # pass over the vocabulary for it.
    top = largest / temperature
    ok = np.isfinite(top)
    out: list[int | None] = [None] * len(todo)
    if ok.all():
        # In place: fresh (rows, vocab) arrays at every step cost more than the arithmetic.
        x -= top[:, None]
        p = np.exp(x, out=x)
    else:
        p = np.zeros_like(x)
        if ok.any():
            p[ok] = np.exp(x[ok] - top[ok, None])
        for j in np.flatnonzero(~ok).tolist():
            finite = np.isfinite(x[j])
            if not finite.any():
                out[j] = int(np.argmax(logits[todo[j]]))
                continue
            p[j, finite] = np.exp(x[j, finite] - x[j, finite].max())
    sums = p.sum(axis=1)
    p /= sums[:, None]
    us = np.array([rows[i].u for i in todo])
    # 7-8. Top-p and the draw: rows with a nucleus one by one, then the rows keeping every id.
    for j, o in enumerate(opts):
        if o.top_p < 1.0 and out[j] is None:
            out[j] = _nucleus_draw(p[j], 1.0 / sums[j], o.top_p, float(us[j]))
    rest = [j for j, o in enumerate(opts) if out[j] is None]
    if rest:
        for j, tok in zip(rest, _cdf_draw(_take(p, rest), us[rest]), strict=True):
            out[j] = tok
    return out  # type: ignore[return-value]


def _cdf_draw(p: np.ndarray, u: np.ndarray) -> list[int]:
    """Step 8 for each row of ``p`` (rows, vocab) keeping every id: the first id whose running
    mass exceeds u * total."""
    cum = np.cumsum(p, axis=1)
    at = np.count_nonzero(cum <= (u * cum[:, -1])[:, None], axis=1)  # searchsorted(..., "right")
    out = []
    for j, a in enumerate(at.tolist()):
        if a >= p.shape[1]:  # u * total landed on the total: the last id with mass
            a = int(np.flatnonzero(p[j])[-1]) if p[j].any() else p.shape[1] - 1
        out.append(a)
    return out


# Top-p looks at the ids with p >= the largest p * 2**-11 first, then 2**-16, then the whole row.
# In the bundled model's logits along sampled text (temperature 0.8) the first floor holds a
# median 122 ids (90th percentile 655) and their mass reaches 0.95 in 96 % of the rows; 2**-9
# (median 59 ids) reached it in 64 %, and its retries made the sampler 17 % slower per row.
_CANDIDATE_FLOORS = (2.0**-11, 2.0**-16, 0.0)


def _nucleus_draw(p: np.ndarray, pmax: float, top_p: float, u: float) -> int:
    """Steps 7-8 for one row of probabilities ``p`` (its largest is ``pmax``): keep the shortest
    prefix of the ids sorted by probability (descending, lower id first on ties) whose mass
    reaches top_p, then draw among them in id order.

    One row at a time: a row's work here is a dozen calls on arrays of tens of ids, and doing
    them per row costs less than padding a block's rows to one shape. Exactness: the ids with
    p >= t (any t) are a prefix of that order (ties are all in or all out), so when their running
    mass reaches top_p the kept ids are among them; the running mass needs only their values in
    descending order (equal values in any order give the same sums), and the kept ids are then
    those above the last kept value plus the lowest ids equal to it. The last floor, 0, takes
    every id: the definition itself.
    """
    # ndarray methods rather than numpy's functions: the same operations without the wrappers'
    # dispatch, which costs as much as the work on arrays this small.
    for floor in _CANDIDATE_FLOORS:
        ids = (p >= pmax * floor).nonzero()[0]  # ascending ids
        cand = p[ids]
        desc = cand.copy()
        desc.sort()
        desc = desc[::-1]  # the running mass needs only the values (ties add the same)
        k = int(desc.cumsum().searchsorted(top_p))  # the first prefix reaching top_p
        if k < len(ids):
            break
    else:  # rounding left the whole row's mass just under top_p: every id is kept
        k = len(ids) - 1
    # The kept ids: those above the prefix's last value v, then the lowest ids equal to v (all
    # of the ids equal to v unless more of them tie than the prefix takes).
    v = desc[k]
    keep = cand >= v
    if int(keep.sum()) > k + 1:
        keep = cand > v
        ties = (cand == v).nonzero()[0]
        keep[ties[: k + 1 - int(keep.sum())]] = True
    kept_p = cand[keep]
    cum = kept_p.cumsum()  # the kept mass in id order
    at = int(cum.searchsorted(u * cum[-1], side="right"))  # the first running mass above u * total
    if at >= len(kept_p):  # u * total landed on the total: the last kept id with mass
        at = int(kept_p.nonzero()[0][-1])
    return int(ids[keep][at])


def check_seed(seed: int) -> None:
    """numpy's generator takes seeds in 0..2**64-1 (and raises a bare ValueError otherwise)."""
    if not 0 <= seed < 2**64:
        raise GptsError(f"--seed: expected an integer in 0..2**64-1, found {seed}")


class NgramBans:
    """``banned_ngram_tokens`` kept up to date as a history grows: each new token indexes one
    n-gram (its n - 1 predecessors -> the ids that followed them), so a step costs one lookup
    instead of a scan of the whole history. The same sets, tested against the scan."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.follows: dict[tuple[int, ...], set[int]] = {}
        self.indexed = 0  # history[:indexed] is in ``follows``

    def banned(self, history: list[int]) -> Collection[int]:
        """The ids banned after ``history`` (which only ever grows between calls). Read-only."""
        n = self.n
        if n <= 0 or len(history) < n:
            return ()
        for end in range(max(self.indexed, n - 1), len(history)):
            self.follows.setdefault(tuple(history[end - n + 1 : end]), set()).add(history[end])
        self.indexed = len(history)
        return self.follows.get(tuple(history[len(history) - n + 1 :]), ())


class SequenceSampler:
    """One sequence's sampling state, advanced one token at a time by whoever runs the model.

    ``generate_tokens`` drives it with a runtime's ``step``; the server's batch scheduler drives
    many of them with one batched model step. Either way the tokens are the same for the same
    prompt, options and seed: the draws come from ``np.random.default_rng(seed)`` in order.

    Protocol: feed ``self.feed`` to the model (after a fresh cache when ``self.reset``), pass the
    logits to ``advance``; repeat while ``not self.done``.
    """

    def __init__(
        self,
        prompt_ids: Sequence[int],
        opts: SamplingOptions,
        *,
        context_length: int,
        vocab_size: int,
        eos_id: int = 0,
        seed: int = 0,
        draws: Iterator[float] | None = None,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        check_seed(seed)
        ids = [int(t) for t in prompt_ids] or [eos_id]
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise GptsError(f"token id {bad[0]} is outside the vocabulary (expected 0..{vocab_size - 1})")
        self.truncated_from = 0  # the prompt's length in tokens when it had to be cut, else 0
        if len(ids) > context_length:
            self.truncated_from = len(ids)
            if warn:
                warn(
                    f"note: prompt has {len(ids)} tokens; keeping the last {context_length} (context length)"
                )
            ids = ids[-context_length:]
        # The seed that rebuilds this sampler elsewhere (an engine process); None with custom draws.
        self.seed: int | None = seed if draws is None else None
        if draws is None:
            draws = iter(np.random.default_rng(seed).random, None)
        self.opts, self.context_length, self.eos_id = opts, context_length, eos_id
        self._draws, self._warn = draws, warn
        self.prompt = list(ids)
        self.history = list(ids)
        self.feed: list[int] = list(ids)  # what the model must read next
        self.reset = True  # the model must start from a fresh cache before reading ``feed``
        self.filled = 0  # positions in the model's cache once ``feed`` is read
        self.generated = 0
        self.slid = False
        self.done = opts.max_new_tokens == 0
        # The history's distinct ids (for the repetition penalty) and its n-gram index, kept up
        # to date token by token rather than recomputed from the history at every step.
        self._seen = np.zeros(vocab_size, dtype=np.int64)
        self._seen_set: set[int] = set()
        self._n_seen = 0
        for t in ids:
            self._see(t)
        self._bans = NgramBans(opts.no_repeat_ngram_size)

    def advance(self, logits: np.ndarray) -> int:
        """Sample the next token from the logits after ``feed``; sets the next ``feed``."""
        return advance_rows([self], np.asarray(logits)[None])[0]

    def _row(self) -> SampleRow:
        """This step's sampler input (consumes one draw, as every step does)."""
        seen = self._seen[: self._n_seen]
        return SampleRow(self.opts, seen, self._bans.banned(self.history), next(self._draws))

    def _see(self, tok: int) -> None:
        if tok not in self._seen_set:
            self._seen_set.add(tok)
            self._seen[self._n_seen] = tok
            self._n_seen += 1

    def _accept(self, tok: int) -> int:
        """Record the sampled token and set the next ``feed``."""
        self.filled = len(self.feed) if self.reset else self.filled + len(self.feed)
        self.history.append(tok)
        self._see(tok)
        self.generated += 1
        self.reset = False
        if (self.opts.stop_at_eos and tok == self.eos_id) or self.generated >= self.opts.max_new_tokens:
            self.done = True  # no model step whose logits nobody reads
            self.feed = []
        elif self.filled + 1 > self.context_length:
            # At least one token: with a context under 4, 3/4 of it rounds to 0, and
            # history[-0:] would keep the whole history.
            keep = self.history[-max(1, self.context_length * 3 // 4) :]
            if self._warn and not self.slid:
                self._warn(
                    f"note: context of {self.context_length} tokens is full; sliding the window "
                    f"(re-reading the last {len(keep)} tokens)"
                )
            self.slid = True
            self.feed, self.reset = keep, True
        else:
            self.feed = [tok]
        return tok


def advance_rows(samplers: Sequence[SequenceSampler], logits: np.ndarray) -> list[int]:
    """Advance several sequences at once: row i of ``logits`` (rows, vocab) holds the logits after
    ``samplers[i].feed``. One ``sample_rows`` call for all of them; the same tokens as advancing
    each alone (``advance`` is this with one row)."""
    toks = sample_rows(logits, [s._row() for s in samplers])
    return [s._accept(tok) for s, tok in zip(samplers, toks, strict=True)]


def generate_tokens(
    step: StepFn,
    new_cache: Callable[[], Any],
    prompt_ids: Sequence[int],
    opts: SamplingOptions,
    *,
    context_length: int,
    vocab_size: int,
    eos_id: int = 0,
    seed: int = 0,
    draws: Iterator[float] | None = None,
    warn: Callable[[str], None] | None = None,
) -> Iterator[int]:
    """Yield new token ids. Prefill is one ``step`` call, then one call per token.

    When the context fills up, the window slides: the cache is dropped and the most recent
    3/4 of the context is prefilled again (positions restart at 0), then generation goes on.
    """
    seq = SequenceSampler(
        prompt_ids,
        opts,
        context_length=context_length,
        vocab_size=vocab_size,
        eos_id=eos_id,
        seed=seed,
        draws=draws,
        warn=warn,
    )
    cache = new_cache()
    logits, cache = step(np.asarray(seq.feed, dtype=np.int64), cache)
    while not seq.done:
        yield seq.advance(logits)
        if seq.done:
            return
        if seq.reset:
            cache = new_cache()
        logits, cache = step(np.asarray(seq.feed, dtype=np.int64), cache)
