"""The shared numpy sampler and generation loop: golden vectors, an independent plain-Python
sampler, seeds, option errors, empty and over-long prompts, sliding past the context."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from gpts_edge.errors import GptsError
from gpts_edge.generation import generate_text, sampling_options
from gpts_edge.sampling import SamplingOptions, banned_ngram_tokens, generate_tokens, sample

GOLDEN = Path(__file__).resolve().parent / "golden" / "sampling.json"


def _load_golden() -> list[dict]:
    data = json.loads(GOLDEN.read_text())
    assert data["format"] == "gpts-edge sampling golden vectors"
    return data["cases"]


def _logits(case: dict) -> np.ndarray:
    return np.array(
        [{"-inf": -math.inf, "inf": math.inf}.get(v, v) for v in case["logits"]], dtype=np.float64
    )


def reference_sample(logits: list[float], o: dict, history: list[int], u: float) -> int:
    """The documented rules, written again with plain Python lists and math.exp."""
    x = [float(v) for v in logits]
    r = o["repetition_penalty"]
    if r != 1.0:
        for t in set(history):
            x[t] = x[t] / r if x[t] > 0 else x[t] * r
    n = o["no_repeat_ngram_size"]
    if n > 0 and len(history) >= n:
        tail = history[len(history) - n + 1 :]
        for i in range(len(history) - n + 1):
            if history[i : i + n - 1] == tail:
                x[history[i + n - 1]] = -math.inf
    if all(v == -math.inf for v in x):
        return max(range(len(logits)), key=lambda i: (logits[i], -i))
    if o["temperature"] == 0:
        return max(range(len(x)), key=lambda i: (x[i], -i))
    x = [v / o["temperature"] for v in x]
    k = o["top_k"]
    if 0 < k < len(x):
        kth = sorted(x, reverse=True)[k - 1]
        x = [v if v >= kth else -math.inf for v in x]
    if all(v == -math.inf for v in x):
        return max(range(len(logits)), key=lambda i: (logits[i], -i))
    m = max(x)
    e = [math.exp(v - m) if v != -math.inf else 0.0 for v in x]
    total = sum(e)
    p = [v / total for v in e]
    if o["top_p"] < 1.0:
        order = sorted(range(len(p)), key=lambda i: (-p[i], i))
        kept, mass = set(), 0.0
        for i in order:
            kept.add(i)
            mass += p[i]
            if mass >= o["top_p"]:
                break
        p = [v if i in kept else 0.0 for i, v in enumerate(p)]
    target = u * sum(p)
    acc = 0.0
    for i, v in enumerate(p):
        acc += v
        if v > 0 and acc > target:
            return i
    return max(i for i, v in enumerate(p) if v > 0)


GOLDEN_CASES = _load_golden()


def test_golden_file_covers_every_rule() -> None:
    names = " | ".join(c["name"] for c in GOLDEN_CASES)
    for rule in (
        "greedy",
        "ties",
        "repetition penalty",
        "no-repeat-ngram",
        "temperature",
        "top-k",
        "top-p",
        "-inf",
        "boundary",
    ):
        assert rule in names, rule
    random_cases = [c for c in GOLDEN_CASES if c["name"].startswith("random")]
    assert len(random_cases) >= 150
    assert len({c["expected"] for c in random_cases}) > 30  # real draws, not only argmax
    assert any(len(c["logits"]) == 4096 for c in random_cases)


@pytest.mark.parametrize("case", GOLDEN_CASES, ids=[c["name"] for c in GOLDEN_CASES])
def test_sampler_matches_golden_vectors(case: dict) -> None:
    opts = SamplingOptions(**case["opts"])
    assert sample(_logits(case), opts, case["history"], case["u"]) == case["expected"]


def test_golden_vectors_agree_with_an_independent_plain_python_sampler() -> None:
    wrong = [
        (c["name"], c["expected"], got)
        for c in GOLDEN_CASES
        if (got := reference_sample(list(_logits(c)), c["opts"], c["history"], c["u"])) != c["expected"]
    ]
    assert not wrong, wrong[:5]


def test_golden_file_is_what_make_golden_writes() -> None:
    from tests.make_golden import build, render

    assert GOLDEN.read_text() == render(build()), (
        "run: python tests/make_golden.py (and say why in the commit)"
    )


def test_sampler_agrees_with_plain_python_sampler_on_fresh_random_cases() -> None:
    rng = np.random.default_rng(7)
    for _ in range(300):
        vocab = int(rng.choice([2, 5, 40]))
        logits = rng.standard_normal(vocab) * 3
        o = {
            "temperature": float(rng.choice([0.0, 0.5, 1.0])),
            "top_k": int(rng.choice([0, 2, 5])),
            "top_p": float(rng.choice([1.0, 0.9, 0.3])),
            "repetition_penalty": float(rng.choice([1.0, 1.2])),
            "no_repeat_ngram_size": int(rng.choice([0, 2, 3])),
        }
        history = rng.integers(0, min(vocab, 4), size=int(rng.integers(0, 10))).tolist()
        u = float(rng.random())
        assert sample(logits, SamplingOptions(**o), history, u) == reference_sample(
            list(logits), o, history, u
        )


def test_draw_frequencies_follow_the_probabilities() -> None:
    logits = np.log(np.array([0.1, 0.2, 0.3, 0.4]))
    opts = SamplingOptions(temperature=1.0, top_p=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0)
    us = (np.arange(10000) + 0.5) / 10000  # evenly spread draws: exact quantiles
    counts = np.bincount([sample(logits, opts, [], u) for u in us], minlength=4)
    assert counts.tolist() == [1000, 2000, 3000, 4000]


def test_banned_ngram_tokens() -> None:
    assert banned_ngram_tokens([5, 6, 7, 5, 6], 3) == {7}
    assert banned_ngram_tokens([5, 6, 7, 5, 6], 0) == set()
    assert banned_ngram_tokens([5, 6], 3) == set()
    assert banned_ngram_tokens([1, 2, 1, 3, 1], 2) == {2, 3}


# --- options ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"temperature": -0.1}, "--temperature"),
        ({"temperature": float("nan")}, "--temperature"),
        ({"top_p": 0.0}, "--top-p"),
        ({"top_p": 1.5}, "--top-p"),
        ({"top_p": -0.2}, "--top-p"),
        ({"top_k": -1}, "--top-k"),
        ({"repetition_penalty": 0.0}, "--repetition-penalty"),
        ({"no_repeat_ngram_size": -2}, "--no-repeat-ngram-size"),
        ({"max_new_tokens": -1}, "--max-new-tokens"),
    ],
)
def test_bad_sampling_options_are_clear_errors(kwargs: dict, needle: str) -> None:
    with pytest.raises(GptsError) as err:
        SamplingOptions(**kwargs)
    assert str(err.value).startswith(needle) and "found" in str(err.value)


def test_unknown_runtime_is_a_clear_error() -> None:
    from gpts_edge.api import open_runtime

    with pytest.raises(GptsError, match="unknown runtime 'tensorflow'; choose from torch, onnx, gguf"):
        open_runtime("tensorflow")


def test_options_default_to_generation_config_and_accept_overrides() -> None:
    gen = {
        "do_sample": True,
        "temperature": 0.8,
        "top_k": 0,
        "top_p": 0.95,
        "repetition_penalty": 1.1,
        "no_repeat_ngram_size": 4,
        "max_new_tokens": 80,
    }
    o = sampling_options(gen)
    assert (
        o.temperature,
        o.top_k,
        o.top_p,
        o.repetition_penalty,
        o.no_repeat_ngram_size,
        o.max_new_tokens,
    ) == (0.8, 0, 0.95, 1.1, 4, 80)
    o = sampling_options(gen, temperature=0.5, top_k=None, max_new_tokens=7)
    assert (o.temperature, o.top_k, o.max_new_tokens) == (0.5, 0, 7)
    assert sampling_options(gen, greedy=True).greedy
    assert sampling_options({**gen, "do_sample": False}).greedy


# --- the generation loop, with a fake model that records what it is given ------------------------
class Recorder:
    """A step function whose logits favour (last token + 1) mod V; records every call and the
    length of its cache (the tokens it has seen since the last reset)."""

    def __init__(self, vocab: int = 50, context: int = 16) -> None:
        self.vocab, self.context = vocab, context
        self.calls: list[list[int]] = []
        self.cache_lengths: list[int] = []

    def new_cache(self) -> list[int]:
        return []

    def step(self, tokens: np.ndarray, cache: list[int]):
        assert tokens.dtype == np.int64 and tokens.ndim == 1
        cache = cache + tokens.tolist()
        assert len(cache) <= self.context, "the loop fed more tokens than the context holds"
        self.calls.append(tokens.tolist())
        self.cache_lengths.append(len(cache))
        logits = np.zeros(self.vocab)
        logits[(cache[-1] + 1) % self.vocab] = 10.0
        return logits, cache

    def run(self, prompt: list[int], n: int, warn=None, **opts) -> list[int]:
        o = SamplingOptions(
            **{
                "temperature": 0.0,
                "repetition_penalty": 1.0,
                "no_repeat_ngram_size": 0,
                "max_new_tokens": n,
                "stop_at_eos": False,
                **opts,
            }
        )
        return list(
            generate_tokens(
                self.step,
                self.new_cache,
                prompt,
                o,
                context_length=self.context,
                vocab_size=self.vocab,
                warn=warn,
            )
        )


def test_empty_prompt_starts_from_endoftext() -> None:
    rec = Recorder()
    out = rec.run([], 3)
    assert rec.calls[0] == [0]
    assert out == [1, 2, 3]


def test_prefill_is_one_call_then_one_token_per_call() -> None:
    rec = Recorder()
    rec.run([3, 4, 5], 4)
    assert rec.calls == [[3, 4, 5], [6], [7], [8]]


def test_long_prompt_keeps_the_most_recent_tokens_with_a_note() -> None:
    rec, notes = Recorder(context=16), []
    prompt = list(range(1, 41))  # 40 tokens > 16
    out = rec.run(prompt, 1, warn=notes.append)
    assert rec.calls[0] == prompt[-16:]
    assert out == [41]
    assert notes and "40 tokens" in notes[0] and "last 16" in notes[0]


def test_generation_past_the_context_slides_the_window() -> None:
    rec, notes = Recorder(vocab=50, context=16), []
    out = rec.run([1, 2, 3], 40, warn=notes.append)
    assert len(out) == 40
    assert out == [(2 + i) % 50 + 1 for i in range(1, 41)]  # the chain never breaks across a slide
    assert max(rec.cache_lengths) == 16
    history = [1, 2, 3, *out]
    slides = [c for c in rec.calls[1:] if len(c) > 1]
    assert slides and all(len(c) == 12 for c in slides)  # the last 3/4 of the context
    first = rec.calls.index(slides[0])
    # The window re-read is exactly the most recent tokens at that moment.
    assert slides[0] == history[: 3 + first][-12:]
    assert len(notes) == 1 and "sliding" in notes[0]


def test_stop_at_endoftext() -> None:
    rec = Recorder(vocab=10)
    o = {"stop_at_eos": True}
    assert rec.run([7], 10, **o) == [8, 9, 0]


def test_token_outside_the_vocabulary_is_a_clear_error() -> None:
    with pytest.raises(GptsError, match="outside the vocabulary"):
        Recorder(vocab=10).run([3, 12], 1)


# --- with the real tiny model -------------------------------------------------------------------
@pytest.fixture(scope="module")
def runtime(tiny_checkpoint):
    from gpts_edge.torch_runtime import TorchRuntime

    return TorchRuntime(tiny_checkpoint)


def _text(rt, prompt: str, seed: int, **kw) -> str:
    opts = sampling_options(rt.generation_config, max_new_tokens=kw.pop("n", 20), **kw)
    return "".join(generate_text(rt, prompt, opts, seed=seed))


def test_same_seed_same_text(runtime) -> None:
    a, b = _text(runtime, "The future of AI is", 1), _text(runtime, "The future of AI is", 1)
    assert a == b and len(a) > 0
    assert _text(runtime, "The future of AI is", 2) != a


def test_greedy_ignores_the_seed(runtime) -> None:
    assert _text(runtime, "Hello", 1, greedy=True) == _text(runtime, "Hello", 99, greedy=True)


def test_real_model_generation_slides_past_its_context(runtime) -> None:
    ctx = runtime.config.context_length  # 64 for the tiny preset
    notes: list[str] = []
    opts = SamplingOptions(max_new_tokens=ctx + 30, stop_at_eos=False)
    from gpts_edge.generation import generate_ids

    ids = list(generate_ids(runtime, [5] * (ctx + 10), opts, seed=0, warn=notes.append))
    assert len(ids) == ctx + 30
    assert any("keeping the last 64" in n for n in notes) and any("sliding" in n for n in notes)
