"""Generation edge cases: tiny contexts slide, stop_at_eos=False is honoured, streaming decode
is incremental and exact on tricky UTF-8."""

from __future__ import annotations

import numpy as np
import pytest

from gpts_edge.checkpoint import default_model_dir
from gpts_edge.config import ModelConfig
from gpts_edge.constants import DEFAULT_GENERATION
from gpts_edge.generation import TextModel
from gpts_edge.sampling import SamplingOptions, generate_tokens
from gpts_edge.tokenizer import EOT, EOT_ID, StreamDecoder, load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(default_model_dir() / "tokenizer.json")


class FavourOne:
    """A fake runtime whose next token is always ``favourite``; records every step's tokens."""

    def __init__(self, tok, favourite: int, context_length: int = 64) -> None:
        self.config = ModelConfig(context_length=context_length)
        self.tokenizer = tok
        self.generation_config = dict(DEFAULT_GENERATION)
        self.favourite = favourite
        self.steps: list[list[int]] = []
        self.refills: list[list[int]] = []  # steps on a fresh cache after the first (a slide)

    def new_cache(self) -> list[int]:
        return []

    def step(self, tokens: np.ndarray, cache: list[int]) -> tuple[np.ndarray, list[int]]:
        self.steps.append([int(t) for t in tokens])
        if not cache and len(self.steps) > 1:
            self.refills.append(self.steps[-1])
        logits = np.zeros(self.config.vocab_size, dtype=np.float32)
        logits[self.favourite] = 10.0
        return logits, cache + self.steps[-1]


@pytest.mark.parametrize("context", [1, 2, 3, 4, 8])
def test_a_tiny_context_slides_instead_of_rereading_the_whole_history(tok, context: int) -> None:
    rt = FavourOne(tok, favourite=7, context_length=context)
    opts = SamplingOptions(
        temperature=0.0, max_new_tokens=12, stop_at_eos=False, repetition_penalty=1.0, no_repeat_ngram_size=0
    )
    out = list(generate_tokens(rt.step, rt.new_cache, [5], opts, context_length=context, vocab_size=4096))
    assert out == [7] * 12
    assert max(len(s) for s in rt.steps) <= context  # the window never outgrows the context
    assert rt.refills, "the context filled up, so the window must have slid"
    assert all(len(s) == max(1, context * 3 // 4) for s in rt.refills)


def test_stop_at_eos_false_keeps_generating_past_endoftext(tok) -> None:
    model = TextModel(FavourOne(tok, favourite=EOT_ID))
    assert model.generate("Hi", max_new_tokens=3) == ""
    assert model.generate("Hi", max_new_tokens=3, stop_at_eos=False) == EOT * 3
    assert "".join(model.stream("Hi", 2, stop_at_eos=False)) == EOT * 2


def _byte_token(tok, b: int) -> int:
    from gpts_edge.tokenizer import _BYTE_OF

    char = next(c for c, v in _BYTE_OF.items() if v == b)
    return tok.token_to_id(char)


TRICKY = [
    "naïve café — 日本語 😀👍🏽 e\u0301 \U0010ffff end",
    "\ufffd a real replacement character",
    "Zalgo: Z̸̛a̷l̶g̵o̴",
]


def _stream(tok, ids: list[int]) -> list[str]:
    dec = StreamDecoder(tok)
    return [dec.push(i) for i in ids] + [dec.flush()]


def test_stream_decode_matches_full_decode_on_tricky_utf8(tok) -> None:
    rng = np.random.default_rng(0)
    cases = [tok.encode(t).ids for t in TRICKY]
    # Single bytes cut characters anywhere: lone continuation bytes, truncated 4-byte sequences,
    # overlong encodings and surrogates, mixed with ordinary tokens and <|endoftext|>.
    for _ in range(300):
        n = int(rng.integers(1, 25))
        ids = [
            _byte_token(tok, int(rng.integers(0x80, 0x100)))
            if rng.random() < 0.6
            else int(rng.integers(0, 4096))
            for _ in range(n)
        ]
        cases.append(ids)
    cases.append([_byte_token(tok, b) for b in b"\xf0\x9f\x98"])  # never completed
    cases.append([_byte_token(tok, b) for b in b"\xed\xa0\x80a"])  # an encoded surrogate
    for ids in cases:
        pieces = _stream(tok, ids)
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=False)


def test_stream_decode_of_a_long_text_never_redecodes_the_history(tok) -> None:
    """8,000 tokens: each push decodes only the tokens since the last piece."""
    ids = [int(i) for i in np.random.default_rng(1).integers(1, 4096, 8000)]

    class Counting:
        def __init__(self, inner) -> None:
            self.inner, self.decoded = inner, 0

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def decode(self, ids, **kw):
            self.decoded += len(ids)
            return self.inner.decode(ids, **kw)

    counting = Counting(tok)
    dec = StreamDecoder(counting)
    text = "".join([dec.push(i) for i in ids] + [dec.flush()])
    assert text == tok.decode(ids, skip_special_tokens=False)
    assert counting.decoded == 0  # byte-level: token bytes, no tokenizer decode at all


def test_stream_decode_of_a_non_byte_level_tokenizer_decodes_only_the_tail(tok) -> None:
    class NotByteLevel:
        decoder = None

        def __init__(self, inner) -> None:
            self.inner, self.decoded = inner, 0

        def get_added_tokens_decoder(self):
            return self.inner.get_added_tokens_decoder()

        def decode(self, ids, **kw):
            self.decoded += len(ids)
            return self.inner.decode(ids, **kw)

    ids = tok.encode(" ".join(TRICKY) * 40).ids
    fake = NotByteLevel(tok)
    pieces = _stream(fake, ids)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=False)
    assert fake.decoded < 3 * len(ids)  # the full-history decode would be ~len(ids)**2 / 2
