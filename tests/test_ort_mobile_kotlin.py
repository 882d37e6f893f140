"""The Android sample's pure-Kotlin parts agree with Python: BpeTokenizer encodes and decodes like
the `tokenizers` library, Sampler picks the same token as gpts_edge.sampling.sample, and the
SplitMix64 stream is the one the browser sample uses.

Compiled on the desktop JVM with kotlinc (Debian's `kotlin` package); skipped when kotlinc or java
is missing. onnxruntime-android itself cannot be exercised here (see examples/android/README.md).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from gpts_edge.checkpoint import default_model_dir
from gpts_edge.sampling import SamplingOptions, generate_tokens, sample
from gpts_edge.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parent.parent
SRC = REPO / "examples/android/app/src/main/java/dev/gptsedge/sample"
SOURCES = [SRC / f"{n}.kt" for n in ("Json", "BpeTokenizer", "Sampler", "Generator")] + [
    REPO / "examples/android/jvmcheck/Check.kt"
]

pytestmark = pytest.mark.skipif(
    shutil.which("kotlinc") is None or shutil.which("java") is None,
    reason="kotlinc or java not installed (apt-get install kotlin default-jdk-headless)",
)

TEXTS = [
    "Once upon a time, there was a little girl named Lily.",
    "She said: \"I'll go, you're late, it's 3:45pm!\"  Two  spaces\tand a tab.\n\nNew paragraph.",
    "   leading spaces and trailing   ",
    "Numbers 1234567 and 3.14159, hyphen-ated words; under_scores & symbols #@!?",
    "Café naïve résumé — “quotes” … 中文字符 and an emoji 🦊🚀 plus ünïcödé",
    "before<|endoftext|>after <|endoftext|><|endoftext|> end",
    "\n",
    "",
    "I'M SHOUTING'S OK? we've they'd she'll",
]


@pytest.fixture(scope="module")
def check_jar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    jar = tmp_path_factory.mktemp("kotlin") / "check.jar"
    proc = subprocess.run(
        ["kotlinc", *map(str, SOURCES), "-include-runtime", "-d", str(jar)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return jar


def _splitmix64(seed: int, n: int) -> list[float]:
    mask = (1 << 64) - 1
    state, out = seed & mask, []
    for _ in range(n):
        state = (state + 0x9E3779B97F4A7C15) & mask
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        z ^= z >> 31
        out.append((z >> 11) / 2**53)
    return out


def _cases(seed: int = 0) -> list[tuple[np.ndarray, SamplingOptions, list[int], float]]:
    rng = np.random.default_rng(seed)
    option_sets = [
        SamplingOptions(temperature=0.0, repetition_penalty=1.0, no_repeat_ngram_size=0),
        SamplingOptions(temperature=0.0, repetition_penalty=1.3, no_repeat_ngram_size=3),
        SamplingOptions(),  # the generation_config.json defaults
        SamplingOptions(temperature=1.0, top_k=40, top_p=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0),
        SamplingOptions(temperature=0.7, top_k=5, top_p=0.5, repetition_penalty=1.2, no_repeat_ngram_size=2),
        SamplingOptions(temperature=1.5, top_k=0, top_p=0.9, repetition_penalty=0.9, no_repeat_ngram_size=4),
    ]
    cases = []
    for k in range(60):
        logits = (rng.standard_normal(4096) * rng.uniform(0.5, 6.0)).astype(np.float32)
        # Repeated ids make the penalty and the n-gram ban bite.
        history = [int(t) for t in rng.integers(0, 12, size=int(rng.integers(0, 30)))]
        logits[:12] += 4.0
        u = float(rng.random()) if k % 10 else [0.0, 0.999999999][k // 10 % 2]
        cases.append((logits, option_sets[k % len(option_sets)], history, u))
    return cases


TOY_VOCAB, TOY_CONTEXT = 64, 16


def _opts_json(o: SamplingOptions) -> dict:
    return {
        "temperature": float(o.temperature),
        "top_k": float(o.top_k),
        "top_p": float(o.top_p),
        "repetition_penalty": float(o.repetition_penalty),
        "no_repeat_ngram_size": float(o.no_repeat_ngram_size),
        "max_new_tokens": float(o.max_new_tokens),
    }


def _toy_step(tokens: np.ndarray, cache: int) -> tuple[np.ndarray, int]:
    """The same toy model as Check.kt: exact integer arithmetic of (last id, cache length)."""
    length = cache + len(tokens)
    assert length <= TOY_CONTEXT
    j = np.arange(TOY_VOCAB, dtype=np.int64)
    logits = ((j * 7919 + int(tokens[-1]) * 104729 + length * 31) % 1000).astype(np.float32) / np.float32(100)
    return logits, length


def _loop_cases() -> list[tuple[SamplingOptions, list[int], list[float]]]:
    rng = np.random.default_rng(5)
    cases = []
    for k, o in enumerate(
        [
            SamplingOptions(
                temperature=0.0, repetition_penalty=1.0, no_repeat_ngram_size=0, max_new_tokens=40
            ),
            SamplingOptions(temperature=0.0, max_new_tokens=40),
            SamplingOptions(temperature=0.9, top_k=10, top_p=0.9, max_new_tokens=40),
            SamplingOptions(temperature=2.0, top_p=1.0, repetition_penalty=1.0, max_new_tokens=60),
        ]
    ):
        prompt = [int(t) for t in rng.integers(1, TOY_VOCAB, size=3 + 7 * k)]  # k=3: longer than the context
        cases.append((o, prompt, [float(u) for u in rng.random(o.max_new_tokens)]))
    return cases


def _python_loop(o: SamplingOptions, prompt: list[int], draws: list[float]) -> list[int]:
    return list(
        generate_tokens(
            _toy_step,
            lambda: 0,
            prompt,
            o,
            context_length=TOY_CONTEXT,
            vocab_size=TOY_VOCAB,
            draws=iter(draws),
        )
    )


def _run(check_jar: Path, tmp_path: Path, request: dict) -> dict:
    req = tmp_path / "request.json"
    req.write_text(json.dumps(request), encoding="utf-8")
    proc = subprocess.run(
        ["java", "-jar", str(check_jar), str(req)], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_kotlin_tokenizer_sampler_and_rng_match_python(check_jar: Path, tmp_path: Path) -> None:
    tok_path = default_model_dir() / "tokenizer.json"
    tok = load_tokenizer(tok_path, 4096)
    cases = _cases()
    request = {
        "tokenizer": str(tok_path),
        "texts": TEXTS,
        "cases": [
            {
                "logits": [float(v) for v in logits],
                "opts": _opts_json(o),
                "history": history,
                "u": u,
            }
            for logits, o, history, u in cases
        ],
        "seed": 1234,
        "n_draws": 5,
        "loops": [
            {
                "opts": _opts_json(o),
                "prompt": prompt,
                "draws": draws,
                "vocab": TOY_VOCAB,
                "context": TOY_CONTEXT,
            }
            for o, prompt, draws in _loop_cases()
        ],
    }
    got = _run(check_jar, tmp_path, request)

    want_ids = [tok.encode(t).ids for t in TEXTS]
    for text, g, w in zip(TEXTS, got["ids"], want_ids, strict=True):
        assert g == w, f"encode({text!r})"
    for text, ids, decoded in zip(TEXTS, want_ids, got["decoded"], strict=True):
        assert decoded == tok.decode(ids) == text.replace("<|endoftext|>", "")

    want_tokens = [sample(logits, o, history, u) for logits, o, history, u in cases]
    assert got["tokens"] == want_tokens
    # The cases must exercise more than argmax: sampled picks differ from the greedy ones.
    greedy = [int(np.argmax(logits)) for logits, *_ in cases]
    assert sum(g != w for g, w in zip(greedy, want_tokens, strict=True)) >= 10

    want_loops = [_python_loop(o, prompt, draws) for o, prompt, draws in _loop_cases()]
    assert got["loops"] == want_loops
    # 40+ tokens in a 16-token context: every loop slid its window at least once (or hit EOS).
    assert all(len(t) > TOY_CONTEXT or t[-1:] == [0] for t in want_loops)

    assert got["draws"] == _splitmix64(1234, 5)
