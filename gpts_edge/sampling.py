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
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

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


def _nucleus(p: np.ndarray, top_p: float) -> np.ndarray:
    """Ids of the shortest prefix of ``p`` sorted by probability (descending, stable) whose mass
    reaches ``top_p`` (at least one).

    The same ids as sorting all of ``p``, found by sorting only the largest probabilities: the
    ids with ``p >= t`` (t = the m-th largest value) are exactly the first ids of the full stable
    order, in the same order, so their running sums are the same numbers (cumsum adds in order).
    When that prefix reaches ``top_p`` the answer is in it; otherwise m grows, up to a full sort.
    A small model's nucleus is usually tens of ids out of 4,096, and a full sort was most of a
    sampling step's time.
    """
    n = len(p)
    m = min(n, 64)
    while m < n:
        t = np.partition(p, n - m)[n - m]
        cand = np.flatnonzero(p >= t)  # ascending ids, so a stable sort breaks ties by id
        order = cand[np.argsort(-p[cand], kind="stable")]
        k = int(np.searchsorted(np.cumsum(p[order]), top_p))
        if k < len(order):
            return order[: k + 1]
        m *= 8
    order = np.argsort(-p, kind="stable")
    return order[: int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1]


def sample(logits: np.ndarray, opts: SamplingOptions, history: Sequence[int], u: float) -> int:
    """One token id from ``logits`` (1-D) given the ids so far and a uniform draw ``u``."""
    x = np.asarray(logits, dtype=np.float64).copy()
    if opts.repetition_penalty != 1.0 and len(history):
        # Repeated ids read the same original value and write the same result, so no np.unique.
        ids = np.asarray(history, dtype=np.int64)
        vals = x[ids]
        x[ids] = np.where(vals > 0, vals / opts.repetition_penalty, vals * opts.repetition_penalty)
    banned = banned_ngram_tokens(history, opts.no_repeat_ngram_size)
    if banned:
        x[list(banned)] = -np.inf
    if not np.isfinite(x).any():  # everything banned: the raw argmax rather than fail
        return int(np.argmax(logits))
    if opts.greedy:
        return int(np.argmax(x))
    x = x / opts.temperature
    if opts.top_k and opts.top_k < len(x):
        kth = np.partition(x, -opts.top_k)[-opts.top_k]
        x[x < kth] = -np.inf
    finite = np.isfinite(x)
    if not finite.any():  # e.g. a tiny temperature overflowed every logit
        return int(np.argmax(logits))
    top = x.max()
    if math.isfinite(top):  # no +inf or NaN: exp(-inf - top) is exactly the 0 of a masked entry
        p = np.exp(x - top)
    else:
        p = np.zeros_like(x)
        p[finite] = np.exp(x[finite] - x[finite].max())
    p /= p.sum()
    if opts.top_p < 1.0:
        keep = np.zeros_like(p, dtype=bool)
        keep[_nucleus(p, opts.top_p)] = True
        p = np.where(keep, p, 0.0)
    cum = np.cumsum(p)
    idx = int(np.searchsorted(cum, u * cum[-1], side="right"))
    idx = min(idx, len(p) - 1)
    while p[idx] == 0 and idx > 0:  # u * total landed exactly on a boundary after the last kept id
        idx -= 1
    return idx


def check_seed(seed: int) -> None:
    """numpy's generator takes seeds in 0..2**64-1 (and raises a bare ValueError otherwise)."""
    if not 0 <= seed < 2**64:
        raise GptsError(f"--seed: expected an integer in 0..2**64-1, found {seed}")


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

    def advance(self, logits: np.ndarray) -> int:
        """Sample the next token from the logits after ``feed``; sets the next ``feed``."""
        self.filled = len(self.feed) if self.reset else self.filled + len(self.feed)
        tok = sample(logits, self.opts, self.history, next(self._draws))
        self.history.append(tok)
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
