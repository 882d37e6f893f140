"""The batched sampler (``sample_rows``): every row of a batch gets exactly the token it gets alone,
on real logits of the bundled model and on hand-made edge cases, and agrees with the plain-Python
sampler of the documented rules; the incremental per-sequence state (distinct ids, n-gram index)
equals recomputing it from the history."""

from __future__ import annotations

import numpy as np
import pytest

from gpts_edge.sampling import (
    NgramBans,
    SampleRow,
    SamplingOptions,
    SequenceSampler,
    banned_ngram_tokens,
    sample,
    sample_rows,
)
from tests.test_core_sampling import reference_sample


@pytest.fixture(scope="module")
def real_cases():
    """(logits, history) at ~900 positions of the bundled model's own generations."""
    from gpts_edge.api import open_runtime
    from gpts_edge.generation import sampling_options

    rt = open_runtime("onnx", None)
    out = []
    for i, text in enumerate(
        ["The future of AI is", "Once upon a time", "", "In 1990, the city of", "1, 2, 3,"]
    ):
        ids = rt.tokenizer.encode(text).ids if text else []
        opts = sampling_options(rt.generation_config, max_new_tokens=180, temperature=[0.8, 1.2, 0.5][i % 3])
        seq = SequenceSampler(ids, opts, context_length=rt.config.context_length, vocab_size=4096, seed=i)
        logits, cache = rt.step(np.asarray(seq.feed, dtype=np.int64), rt.new_cache())
        while not seq.done:
            out.append((np.asarray(logits, dtype=np.float32).copy(), list(seq.history)))
            seq.advance(logits)
            if seq.done:
                break
            if seq.reset:
                cache = rt.new_cache()
            logits, cache = rt.step(np.asarray(seq.feed, dtype=np.int64), cache)
    return out


def _random_opts(rng: np.random.Generator) -> SamplingOptions:
    if rng.random() < 0.3:
        return SamplingOptions()  # the model's defaults, the server's common case
    return SamplingOptions(
        temperature=float(rng.choice([0.0, 0.5, 0.8, 1.0, 1.3, 1e-5, 1e-300])),
        top_k=int(rng.choice([0, 0, 1, 5, 40, 4095, 5000])),
        top_p=float(rng.choice([1.0, 0.95, 0.9, 0.5, 0.999, 1e-9])),
        repetition_penalty=float(rng.choice([1.0, 1.1, 1.3, 0.7])),
        no_repeat_ngram_size=int(rng.choice([0, 1, 2, 3, 4])),
    )


def _row(opts: SamplingOptions, history: list[int], u: float) -> SampleRow:
    seen = np.unique(np.asarray(history, dtype=np.int64))
    return SampleRow(opts, seen, banned_ngram_tokens(history, opts.no_repeat_ngram_size), u)


def _mixed_cases(real_cases, n: int, seed: int) -> list[tuple[np.ndarray, SamplingOptions, list[int], float]]:
    """Real logits with mixed settings, some altered: rounded (ties), -inf entries, scaled up,
    repetitive histories (many bans); draws at the ends of [0, 1) too."""
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(n):
        logits, history = real_cases[int(rng.integers(len(real_cases)))]
        logits = logits.astype(np.float64)
        kind = int(rng.integers(8))
        if kind == 0:
            logits = np.round(logits)
        elif kind == 1:
            logits[rng.integers(0, 4096, 2000)] = -np.inf
        elif kind == 2:
            history = history + history[-6:] * 3
        elif kind == 3:
            logits = logits * 30
        u = float(rng.random()) if rng.random() > 0.03 else float(rng.choice([0.0, 1 - 2**-53]))
        cases.append((logits, _random_opts(rng), history, u))
    return cases


def test_every_row_of_a_batch_gets_its_token_alone(real_cases) -> None:
    cases = _mixed_cases(real_cases, 1500, seed=0)
    alone = [sample_rows(lg[None], [_row(o, h, u)])[0] for lg, o, h, u in cases]
    rng = np.random.default_rng(1)
    start, batched = 0, []
    while start < len(cases):
        part = cases[start : start + int(rng.choice([2, 5, 16, 64, 100]))]  # 100: over one sort key's 64
        batched += sample_rows(np.stack([c[0] for c in part]), [_row(o, h, u) for _, o, h, u in part])
        start += len(part)
    assert batched == alone
    assert len(set(alone)) > 200  # real draws across the vocabulary, not only argmaxes


def test_batched_sampler_agrees_with_the_plain_python_sampler(real_cases) -> None:
    cases = _mixed_cases(real_cases, 120, seed=2)
    got = sample_rows(np.stack([c[0] for c in cases]), [_row(o, h, u) for _, o, h, u in cases])
    want = [
        reference_sample(
            list(lg),
            {
                f: getattr(o, f)
                for f in ("temperature", "top_k", "top_p", "repetition_penalty", "no_repeat_ngram_size")
            },
            h,
            u,
        )
        for lg, o, h, u in cases
    ]
    assert got == want


def _nucleus_reference(p: np.ndarray, top_p: float) -> set[int]:
    order = np.argsort(-p, kind="stable")
    return set(order[: int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1].tolist())


@pytest.mark.parametrize(
    "shape",
    ["peaked", "flat", "ties-at-the-boundary", "one-id", "uniform", "long-tail"],
)
def test_top_p_keeps_the_stable_sort_prefix_whatever_the_distribution(shape: str) -> None:
    """A long tail below the candidate floors sends top-p to the full sort; ties at the boundary
    keep the lower ids. The kept set is read back by drawing at u just below each kept id's edge."""
    rng = np.random.default_rng(5)
    logits = {
        "peaked": rng.standard_normal((8, 4096)) * 4,
        "flat": rng.standard_normal((8, 4096)) * 0.05,
        "ties-at-the-boundary": np.round(rng.standard_normal((8, 4096)) * 2),
        "one-id": np.where(np.arange(4096) == 7, 50.0, 0.0)[None].repeat(8, 0),
        "uniform": np.zeros((8, 4096)),
        # p(id 0) ~ 0.985 and 4,095 ids at 2**-18 of it: 0.999 needs ids below every floor.
        "long-tail": np.where(np.arange(4096) == 0, 0.0, -12.5)[None].repeat(2, 0),
    }[shape]
    top_p = 0.999 if shape == "long-tail" else 0.9
    opts = SamplingOptions(temperature=1.0, top_p=top_p, repetition_penalty=1.0, no_repeat_ngram_size=0)
    for r in range(len(logits)):
        x = logits[r] - logits[r].max()
        p = np.exp(x)
        p /= p.sum()
        kept = sorted(_nucleus_reference(p, top_p))
        mass = np.zeros(4096)
        mass[kept] = p[kept]
        edges = np.cumsum(mass)
        # Just below the edge of up to 48 kept ids (the first and last among them), and 16 draws.
        pick = sorted({kept[0], kept[-1], *rng.choice(kept, min(46, len(kept)), replace=False).tolist()})
        us = [*np.clip(edges[pick] / edges[-1] - 1e-12, 0, 1 - 2**-53), *rng.random(16)]
        want = [min(int(np.searchsorted(edges, u * edges[-1], side="right")), 4095) for u in us]
        want = [t if mass[t] > 0 else kept[-1] for t in want]
        got = sample_rows(np.repeat(logits[r][None], len(us), 0), [_row(opts, [], float(u)) for u in us])
        assert got == want, (shape, r)
        assert set(pick) <= set(got)


def test_top_p_at_its_extremes_agrees_with_the_plain_python_sampler(real_cases) -> None:
    """top_p just under 1 (the rows whose whole mass rounds below it keep every id, past the
    last candidate floor) and a tiny top_p (only the largest id, lower id on a tie), on real
    logits at several temperatures and on rounded ones (many ties)."""
    rng = np.random.default_rng(11)
    checked = 0
    for lg, history in real_cases[::15]:
        for top_p in (1 - 2**-53, 0.99999, 1e-12):
            for temperature, rounded in ((0.8, False), (3.0, False), (1.0, True)):
                logits = np.round(lg.astype(np.float64)) if rounded else lg.astype(np.float64)
                opts = SamplingOptions(temperature=temperature, top_p=top_p)
                u = float(rng.random())
                fields = ("temperature", "top_k", "top_p", "repetition_penalty", "no_repeat_ngram_size")
                want = reference_sample(list(logits), {f: getattr(opts, f) for f in fields}, history, u)
                assert sample_rows(logits[None], [_row(opts, history, u)])[0] == want
                checked += 1
    assert checked >= 500


def test_ngram_index_equals_rescanning_the_history() -> None:
    rng = np.random.default_rng(3)
    for _ in range(300):
        n = int(rng.integers(0, 6))
        bans, history = NgramBans(n), []
        for tok in rng.integers(0, 5, 50).tolist():
            history.append(tok)
            assert set(bans.banned(history)) == banned_ngram_tokens(history, n)


def test_sequence_sampler_equals_sampling_from_the_whole_history(real_cases) -> None:
    """SequenceSampler keeps its distinct ids and bans incrementally; the tokens equal ``sample``
    on the whole history with the same seeded draws."""
    pool = [c[0] for c in real_cases]
    for seed in range(6):
        opts = SamplingOptions(no_repeat_ngram_size=seed % 4 + 1, max_new_tokens=60, stop_at_eos=False)
        prompt = [5, 9, 5, 9, 5]
        seq = SequenceSampler(prompt, opts, context_length=384, vocab_size=4096, seed=seed)
        draws = np.random.default_rng(seed)
        history = list(prompt)
        for i in range(60):
            logits = pool[(seed * 61 + i) % len(pool)]
            want = sample(logits, opts, history, float(draws.random()))
            assert seq.advance(logits) == want
            history.append(want)
