"""Per-choice text without a server: stop strings split across tokens are cut and never leak
into a streamed piece; field validation names the field."""

from __future__ import annotations

import pytest

from gpts_edge.batching import TokenEvent
from gpts_edge.checkpoint import default_model_dir
from gpts_edge.completions import ApiError, Choice, parse_completion
from gpts_edge.tokenizer import StreamDecoder, load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(default_model_dir() / "tokenizer.json")


def _stream(tok, text: str, stops: list[str]) -> tuple[list[str], Choice]:
    choice = Choice(0, StreamDecoder(tok), stops, want_logprobs=True)
    pieces = []
    for t in tok.encode(text).ids:
        ended = choice.push(TokenEvent(t, -1.0), lambda i: tok.decode([i]))
        pieces.append(choice.take(False))
        if ended:
            break
    choice.flush()
    pieces.append(choice.take(True))
    return pieces, choice


def test_stop_string_split_across_tokens_is_cut_and_never_streamed(tok) -> None:
    text = "The lighthouse keeper walked up the stairs every night."
    pieces, choice = _stream(tok, text, ["stairs ev", "zzz"])
    assert "".join(pieces) == "The lighthouse keeper walked up the "
    assert choice.finish == "stop"
    # Pieces only ever add text, so the joined text above shows that none of the stop leaked.
    # Logprob entries stop with the returned text.
    assert "".join(choice.logprobs()["tokens"]).startswith(choice.text)


def test_without_a_stop_every_piece_is_sent_at_once(tok) -> None:
    text = "Once upon a time, there was a river."
    pieces, choice = _stream(tok, text, [])
    assert "".join(pieces) == text and choice.finish is None
    assert all(pieces[:-1])  # nothing held back: each token's text went out with it


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "max_tokens": 1.5}, "max_tokens"),
        ({"prompt": "x", "temperature": True}, "temperature"),
        ({"prompt": "x", "top_k": -2}, "top_k"),
        ({"prompt": "x", "stop": [""]}, "stop"),
        ({"prompt": "x", "stream_options": []}, "stream_options"),
        ({"prompt": "x", "min_p": 0.1}, "min_p"),
    ],
)
def test_invalid_fields_name_the_field(body, param) -> None:
    with pytest.raises(ApiError) as info:
        parse_completion(body, "gpt-s-1.4m")
    assert info.value.status == 400 and info.value.param == param


def test_defaults_are_left_to_generation_config() -> None:
    req = parse_completion({"prompt": ["a", "b"], "top_k": -1}, "gpt-s-1.4m")
    assert req.prompts == ["a", "b"] and req.n == 1 and req.seed is None
    assert req.sampling == {
        "temperature": None,
        "top_p": None,
        "top_k": 0,
        "repetition_penalty": None,
        "no_repeat_ngram_size": None,
        "max_new_tokens": None,
    }
