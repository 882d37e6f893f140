"""The browser's JavaScript sampler (examples/browser/sampler.js) picks the same token as
gpts_edge.sampling.sample for the same logits, options, history and uniform draw."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from gpts_edge.sampling import SamplingOptions, sample

REPO = Path(__file__).resolve().parent.parent
GOLDEN = REPO / "tests" / "golden" / "sampling.json"

pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="node (Node.js) is not installed")


def _run_js(cases: list[dict], sums: list[list[float]] | None = None, rngs: list[dict] | None = None) -> dict:
    request = json.dumps({"cases": cases, "sums": sums or [], "rngs": rngs or []})
    proc = subprocess.run(
        ["node", str(REPO / "tests/js/sample_cases.mjs")],
        input=request,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _js_samples(cases: list[dict]) -> list[int]:
    return _run_js(cases)["tokens"]


def _random_cases(n: int, seed: int) -> list[tuple[np.ndarray, SamplingOptions, list[int], float]]:
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n):
        vocab = int(rng.choice([2, 7, 9, 33, 130, 300, 4096]))
        logits = (rng.standard_normal(vocab) * rng.choice([0.5, 3.0, 20.0])).astype(np.float32)
        if i % 4 == 0:  # ties everywhere: exercises lowest-id-wins and the stable sorts
            logits = np.round(logits).astype(np.float32)
        opts = SamplingOptions(
            temperature=float(rng.choice([0.0, 0.3, 0.8, 1.0, 1.7])),
            top_k=int(rng.choice([0, 1, 3, 10, 5000])),
            top_p=float(rng.choice([1.0, 0.95, 0.5, 0.05])),
            repetition_penalty=float(rng.choice([1.0, 1.1, 1.5, 0.8])),
            no_repeat_ngram_size=int(rng.choice([0, 1, 2, 3])),
        )
        # Few distinct ids so that n-grams repeat and bans actually happen.
        history = [int(t) for t in rng.integers(0, min(vocab, 4), size=int(rng.integers(0, 12)))]
        u = float(rng.choice([rng.random(), 0.0, 1 - 2**-53]))
        cases.append((logits, opts, history, u))
    return cases


def _as_json(logits: np.ndarray, opts: SamplingOptions, history: list[int], u: float) -> dict:
    return {
        "logits": [float(v) for v in np.asarray(logits, dtype=np.float64)],
        "opts": {
            "temperature": opts.temperature,
            "top_k": opts.top_k,
            "top_p": opts.top_p,
            "repetition_penalty": opts.repetition_penalty,
            "no_repeat_ngram_size": opts.no_repeat_ngram_size,
        },
        "history": history,
        "u": u,
    }


def test_js_sampler_picks_the_same_token_as_python_on_random_cases() -> None:
    cases = _random_cases(400, seed=0)
    expected = [sample(lg, o, h, u) for lg, o, h, u in cases]
    got = _js_samples([_as_json(*c) for c in cases])
    mismatches = [(i, e, g) for i, (e, g) in enumerate(zip(expected, got, strict=True)) if e != g]
    assert not mismatches, f"{len(mismatches)} of {len(cases)} differ (case, python, js): {mismatches[:5]}"
    # The cases must exercise real sampling, not only argmax.
    assert len(set(expected)) > 20


EDGE_CASES = [
    # (logits, options, history, u, token): boundaries where an off-by-one in the port shows
    ([0.0, 0.0], dict(temperature=1.0, top_p=0.5), [], 0.75, 0),  # top-p mass reaches p exactly
    ([1.0, 1.0, 1.0, 0.0], dict(temperature=1.0, top_k=2, top_p=1.0), [], 0.9, 2),  # top-k keeps ties
    ([3.0, 5.0, 5.0], dict(temperature=0.0), [], 0.5, 1),  # greedy: lowest id wins ties
    ([-1.0, -1.05, 0.0], dict(temperature=0.0, repetition_penalty=1.1), [0], 0.5, 2),  # negative * r
    ([2.0, 2.1, 0.0], dict(temperature=0.0, repetition_penalty=1.1), [1], 0.5, 0),  # positive / r
    (
        [0.0, 5.0, 4.0],
        dict(temperature=0.0, no_repeat_ngram_size=2, repetition_penalty=1.0),
        [0, 1, 0],
        0.5,
        2,
    ),
    ([0.0, 0.0, 0.0, 0.0], dict(temperature=1.0, top_p=1.0), [], 0.5, 2),  # u * total on a boundary
]


@pytest.mark.parametrize("case", range(len(EDGE_CASES)))
def test_js_sampler_agrees_with_python_on_boundary_cases(case: int) -> None:
    raw, kwargs, history, u, token = EDGE_CASES[case]
    logits = np.array(raw, dtype=np.float32)
    opts = SamplingOptions(**{"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, **kwargs})
    assert sample(logits, opts, history, u) == token
    assert _js_samples([_as_json(logits, opts, history, u)]) == [token]


def test_js_probability_sum_rounds_like_numpy() -> None:
    # The normaliser p.sum() is numpy's pairwise sum; a plain running sum rounds differently.
    rng = np.random.default_rng(1)
    arrays = [np.exp(rng.standard_normal(n) * 4) for n in (3, 8, 100, 129, 1000, 4096) for _ in range(20)]
    got = _run_js([], [a.tolist() for a in arrays])["sums"]
    assert got == [float(a.sum()) for a in arrays]
    assert any(float(a.sum()) != sum(a.tolist()) for a in arrays)  # the test can tell the two apart


def test_js_random_draws_equal_numpy_default_rng() -> None:
    # Same seed, same draws: with the same logits the page writes the same text as `--seed`.
    seeds = [0, 1, 7, 42, 2**31 - 1, 2**32, 2**32 + 5, 123456789012, 2**53 - 1]
    got = _run_js([], rngs=[{"seed": s, "n": 500} for s in seeds])["draws"]
    assert got == [np.random.default_rng(s).random(500).tolist() for s in seeds]


def test_js_sampler_bans_everything_then_falls_back_to_raw_argmax() -> None:
    logits = np.array([0.5, 2.0, 1.0], dtype=np.float32)
    opts = SamplingOptions(temperature=1.0, top_p=1.0, repetition_penalty=1.0, no_repeat_ngram_size=1)
    history = [0, 1, 2]  # with n=1 every id already seen is banned
    assert sample(logits, opts, history, 0.3) == 1
    assert _js_samples([_as_json(logits, opts, history, 0.3)]) == [1]


@pytest.mark.skipif(
    not GOLDEN.is_file(), reason="tests/golden/sampling.json not present (made by tests/make_golden.py)"
)
def test_js_sampler_matches_golden_vectors() -> None:
    proc = subprocess.run(
        ["node", "--test", str(REPO / "tests/js/sampler_golden.test.mjs")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "# fail 0" in proc.stdout
