"""Write tests/golden/sampling.json: inputs and the token gpts_edge.sampling.sample picks.

    python tests/make_golden.py            # rewrite the file
    python tests/make_golden.py --check    # exit 1 if the file differs from what this writes

Every port of the sampler (the browser's JavaScript, any future one) is pinned to this file, so
regenerate it only when the sampler's documented rules change on purpose.

Case fields: ``logits`` (float64 numbers; the strings "-inf" / "inf" for infinities), ``opts``
(SamplingOptions fields: temperature, top_k, top_p, repetition_penalty, no_repeat_ngram_size),
``history`` (token ids so far, prompt included), ``u`` (the uniform draw in [0, 1)), ``expected``
(the token id). Random cases are kept only when the answer is robust: it does not change when u
or top_p move by 1e-9 or the logits by a relative 1e-12, so a port whose exp() differs from
numpy's in the last bit still agrees. Hand-written cases sit exactly on the boundaries, with
values (equal logits, exp(0) = 1) that every float64 implementation computes exactly.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from gpts_edge.sampling import SamplingOptions, sample

OUT = Path(__file__).resolve().parent / "golden" / "sampling.json"
OPT_FIELDS = ("temperature", "top_k", "top_p", "repetition_penalty", "no_repeat_ngram_size")
NEUTRAL = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0}
LN3 = math.log(3.0)

# (name, logits, options different from NEUTRAL, history, u)
HAND_CASES: list[tuple[str, list[float], dict, list[int], float]] = [
    ("greedy: argmax", [0.1, 2.5, -1.0, 2.4], {"temperature": 0.0}, [], 0.99),
    ("greedy: ties go to the lowest id", [3.0, 5.0, 5.0], {"temperature": 0.0}, [], 0.5),
    (
        "greedy: positive logit divided by the repetition penalty",
        [2.0, 2.1, 0.0],
        {"temperature": 0.0, "repetition_penalty": 1.1},
        [1],
        0.5,
    ),
    (
        "greedy: negative logit multiplied by the repetition penalty",
        [-1.0, -1.05],
        {"temperature": 0.0, "repetition_penalty": 1.1},
        [0],
        0.5,
    ),
    (
        "greedy: penalty counts each seen id once",
        [2.0, 1.5, 0.0],
        {"temperature": 0.0, "repetition_penalty": 1.2},
        [0, 0, 0, 0],
        0.5,
    ),
    (
        "greedy: penalty below 1 boosts seen ids",
        [1.0, 1.5, 0.0],
        {"temperature": 0.0, "repetition_penalty": 0.5},
        [0],
        0.5,
    ),
    (
        "greedy: a zero logit stays zero under the penalty",
        [0.0, -0.5],
        {"temperature": 0.0, "repetition_penalty": 2.0},
        [0],
        0.5,
    ),
    (
        "greedy: no-repeat-ngram 3 bans the token completing a seen trigram",
        [0.0, 1.0, 2.0, 5.0, 4.0],
        {"temperature": 0.0, "no_repeat_ngram_size": 3},
        [1, 2, 3, 1, 2],
        0.5,
    ),
    (
        "greedy: no-repeat-ngram 2 bans every continuation seen after the last token",
        [0.0, 5.0, 4.0, 3.0],
        {"temperature": 0.0, "no_repeat_ngram_size": 2},
        [0, 1, 0, 2, 0],
        0.5,
    ),
    (
        "greedy: no-repeat-ngram 1 bans every seen token",
        [9.0, 8.0, 7.0, 1.0],
        {"temperature": 0.0, "no_repeat_ngram_size": 1},
        [0, 1, 2],
        0.5,
    ),
    (
        "greedy: history shorter than n bans nothing",
        [9.0, 1.0],
        {"temperature": 0.0, "no_repeat_ngram_size": 4},
        [0, 0, 0],
        0.5,
    ),
    ("sample: two equal logits, u below one half", [0.0, 0.0], {}, [], 0.4999),
    ("sample: two equal logits, u exactly one half lands on id 1", [0.0, 0.0], {}, [], 0.5),
    ("sample: four equal logits, u * total on a boundary goes right", [0.0, 0.0, 0.0, 0.0], {}, [], 0.5),
    ("sample: u = 0 takes the first kept id", [-5.0, 1.0, 1.0], {"top_k": 2}, [], 0.0),
    ("sample: u just below 1 takes the last kept id", [1.0, 1.0, -5.0], {"top_k": 2}, [], 1 - 2**-53),
    ("sample: p = (1/4, 3/4), u = 0.2", [0.0, LN3], {}, [], 0.2),
    ("sample: p = (1/4, 3/4), u = 0.3", [0.0, LN3], {}, [], 0.3),
    ("sample: temperature 2 flattens (0.366, 0.634), u = 0.3", [0.0, LN3], {"temperature": 2.0}, [], 0.3),
    (
        "sample: temperature 0.25 sharpens (0.012, 0.988), u = 0.05",
        [0.0, LN3],
        {"temperature": 0.25},
        [],
        0.05,
    ),
    ("top-k 1 is greedy whatever u", [0.5, 3.0, 2.9, -1.0], {"top_k": 1}, [], 0.999),
    ("top-k keeps ties at the boundary", [1.0, 1.0, 1.0, 0.0], {"top_k": 2}, [], 0.9),
    ("top-k larger than the vocabulary is off", [0.0, 0.0, 0.0], {"top_k": 10}, [], 0.9),
    ("top-p: mass reaches p exactly at the first id", [0.0, 0.0], {"top_p": 0.5}, [], 0.75),
    ("top-p: keeps at least one id", [0.0, 0.0, 0.0], {"top_p": 1e-9}, [], 0.99),
    ("top-p: equal probabilities sort lower id first", [0.0, 1.0, 1.0, 0.5], {"top_p": 0.01}, [], 0.99),
    ("top-p: p = 0.75 keeps three of four equal ids", [0.0, 0.0, 0.0, 0.0], {"top_p": 0.75}, [], 0.99),
    ("masked logits (-inf) are never drawn", [-math.inf, 0.0, 0.0], {}, [], 0.0),
    (
        "everything banned: fall back to the raw argmax",
        [0.5, 2.0, 1.0],
        {"no_repeat_ngram_size": 1},
        [0, 1, 2],
        0.3,
    ),
    (
        "greedy, everything banned: fall back to the raw argmax",
        [0.5, 2.0, 1.0],
        {"temperature": 0.0, "no_repeat_ngram_size": 1},
        [0, 1, 2],
        0.3,
    ),
    (
        "all steps together: penalty, ngram ban, temperature, top-k, top-p",
        [2.0, 2.0, 1.0, 0.0, 3.0, -1.0],
        {"temperature": 0.7, "top_k": 4, "top_p": 0.9, "repetition_penalty": 1.3, "no_repeat_ngram_size": 2},
        [4, 0, 4],
        0.6,
    ),
]


def _opts(d: dict) -> SamplingOptions:
    return SamplingOptions(**{k: d[k] for k in OPT_FIELDS})


def _robust(logits: np.ndarray, opts: dict, history: list[int], u: float) -> bool:
    want = sample(logits, _opts(opts), history, u)
    rng = np.random.default_rng(0)
    for du in (-1e-9, 1e-9):
        if sample(logits, _opts(opts), history, min(max(u + du, 0.0), 1 - 2**-53)) != want:
            return False
    if opts["top_p"] < 1.0:
        for dp in (-1e-9, 1e-9):
            if sample(logits, _opts({**opts, "top_p": min(opts["top_p"] + dp, 1.0)}), history, u) != want:
                return False
    for _ in range(3):
        jitter = logits * (1 + rng.uniform(-1e-12, 1e-12, size=logits.shape))
        if sample(jitter, _opts(opts), history, u) != want:
            return False
    return True


def _random_cases(n: int, seed: int) -> list[tuple[str, np.ndarray, dict, list[int], float]]:
    rng = np.random.default_rng(seed)
    cases = []
    while len(cases) < n:
        i = len(cases)
        vocab = int(rng.choice([2, 3, 8, 33, 100, 257] if i % 80 else [4096]))
        # Rounded to 4 decimals: short JSON, and ties happen often in small vocabularies.
        logits = np.round(rng.standard_normal(vocab) * float(rng.choice([0.5, 2.0, 6.0])), 4)
        opts = {
            "temperature": float(rng.choice([0.0, 0.3, 0.8, 1.0, 1.7])),
            "top_k": int(rng.choice([0, 0, 1, 3, 10, 50])),
            "top_p": float(rng.choice([1.0, 0.95, 0.9, 0.5, 0.1])),
            "repetition_penalty": float(rng.choice([1.0, 1.1, 1.3, 0.9])),
            "no_repeat_ngram_size": int(rng.choice([0, 1, 2, 3, 4])),
        }
        # Ids drawn from a few values so that n-grams really repeat and bans happen.
        history = [int(t) for t in rng.integers(0, min(vocab, 5), size=int(rng.integers(0, 14)))]
        u = float(rng.random())
        if _robust(logits, opts, history, u):
            cases.append((f"random {i}", logits, opts, history, u))
    return cases


def _number(v: float) -> float | str:
    return ("inf" if v > 0 else "-inf") if math.isinf(v) else float(v)


def build() -> dict:
    cases = []
    for name, logits, changes, history, u in HAND_CASES:
        opts = {**NEUTRAL, **changes}
        arr = np.asarray(logits, dtype=np.float64)
        cases.append(
            {
                "name": name,
                "logits": [_number(v) for v in arr],
                "opts": opts,
                "history": history,
                "u": u,
                "expected": sample(arr, _opts(opts), history, u),
            }
        )
    for name, logits, opts, history, u in _random_cases(160, seed=2026):
        cases.append(
            {
                "name": name,
                "logits": [_number(v) for v in logits],
                "opts": opts,
                "history": history,
                "u": u,
                "expected": sample(logits, _opts(opts), history, u),
            }
        )
    return {
        "format": "gpts-edge sampling golden vectors",
        "version": 1,
        "generator": "tests/make_golden.py",
        "reference": "gpts_edge.sampling.sample (order of operations in its module docstring)",
        "fields": "logits (float64; '-inf'/'inf' strings), opts, history, u in [0, 1), expected token id",
        "cases": cases,
    }


def render(data: dict) -> str:
    # One case per line: diffs stay readable when a rule changes.
    head = {k: v for k, v in data.items() if k != "cases"}
    lines = [json.dumps(c, separators=(",", ":")) for c in data["cases"]]
    body = json.dumps(head, indent=1)[:-2]
    return body + ',\n "cases": [\n  ' + ",\n  ".join(lines) + "\n ]\n}\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the file instead of writing it")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    text = render(build())
    if args.check:
        same = args.out.is_file() and args.out.read_text() == text
        print("up to date" if same else f"{args.out} differs from what tests/make_golden.py writes")
        return 0 if same else 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(args.out)
    print(f"wrote {args.out} ({len(json.loads(text)['cases'])} cases)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
