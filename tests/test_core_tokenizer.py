"""The bundled byte-level BPE tokenizer: size, <|endoftext|> = 0, exact round trips, streaming
decode that never splits a character, and `gpts-edge tokenizer train`."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from gpts_edge.cli import app
from gpts_edge.errors import GptsError
from gpts_edge.tokenizer import EOT, EOT_ID, StreamDecoder, load_tokenizer, train_tokenizer

TEXTS = [
    "The future of AI is small.",
    "",
    " ",
    "   leading and trailing   ",
    "tabs\tand\nnew\r\nlines\n\n\n",
    "naïve café, Ångström, São Paulo, Dvořák, façade",
    "emoji: 😀🎉👍🏽 family 👨‍👩‍👧‍👦 flag 🇫🇷",
    "中文字符和日本語のテキスト、한국어 텍스트",
    "control \x00\x01\x07\x1b[31m red \x7f end",
    "combining e\u0301 vs \u00e9, zero width\u200bspace, bidi \u202eabc\u202c",
    "math ∑∫√∞ ≠ ≤ ≥, arrows ←→, box ┌─┐",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 astral plane 𐍈 and private use \ue000",
    "many     spaces\u00a0non-breaking\u3000ideographic",
    "<|endoftext|> written in the text",
    "x" * 500,
    "\ufffd replacement char",
    "ends with a real replacement char \ufffd",
]


@pytest.fixture(scope="module")
def tok(tokenizer_json):
    return load_tokenizer(tokenizer_json, vocab_size=4096)


def test_vocabulary_is_exactly_4096_with_endoftext_at_0(tok) -> None:
    assert tok.get_vocab_size() == 4096
    assert tok.token_to_id(EOT) == EOT_ID == 0
    assert tok.id_to_token(0) == EOT
    ids = sorted(tok.get_vocab().values())
    assert ids == list(range(4096))  # no holes


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_any_text_round_trips_exactly(tok, text: str) -> None:
    ids = tok.encode(text).ids
    assert all(0 <= i < 4096 for i in ids)
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_endoftext_separates_documents(tok) -> None:
    ids = tok.encode("one<|endoftext|>two").ids
    assert EOT_ID in ids
    assert tok.decode(ids, skip_special_tokens=False) == "one<|endoftext|>two"


def test_common_english_is_compressed(tok) -> None:
    text = "The future of artificial intelligence is running small language models on phones."
    assert len(tok.encode(text).ids) < len(text) / 3  # a real BPE, not bytes


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_stream_decoder_never_splits_a_character(tok, text: str) -> None:
    ids = tok.encode(text).ids
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    for p in pieces:
        # A split character would show up as U+FFFD or a lone surrogate in some piece.
        assert "\ufffd" not in p or "\ufffd" in text
        p.encode("utf-8")


def test_stream_decoder_holds_back_partial_bytes(tok) -> None:
    """Feed an emoji byte by byte (one byte-level token per byte): nothing until it is whole."""
    emoji = "😀"
    # ByteLevel maps every byte to one printable character, each of which is a vocabulary entry.
    byte_tokens = [tok.token_to_id(_byte_char(b)) for b in emoji.encode("utf-8")]
    assert None not in byte_tokens
    dec = StreamDecoder(tok)
    out = [dec.push(t) for t in byte_tokens]
    assert out == ["", "", "", emoji]
    assert dec.flush() == ""


def test_stream_decoder_flush_releases_an_unfinished_character(tok) -> None:
    dec = StreamDecoder(tok)
    first_two = [tok.token_to_id(_byte_char(b)) for b in "😀".encode()[:2]]
    assert [dec.push(t) for t in first_two] == ["", ""]
    assert dec.flush() == "\ufffd"  # shown as a replacement, never as a broken string


def _byte_char(b: int) -> str:
    from tokenizers import pre_tokenizers

    # The ByteLevel alphabet, ordered as GPT-2's bytes_to_unicode.
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    )
    cs = bs[:]
    n = 0
    for x in range(256):
        if x not in bs:
            bs.append(x)
            cs.append(256 + n)
            n += 1
    mapping = dict(zip(bs, map(chr, cs), strict=True))
    assert set(mapping.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    return mapping[b]


def test_load_tokenizer_errors_name_the_file(tmp_path, tokenizer_json) -> None:
    with pytest.raises(GptsError, match="file not found"):
        load_tokenizer(tmp_path / "tokenizer.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    with pytest.raises(GptsError, match=r"bad\.json: not a valid tokenizer\.json"):
        load_tokenizer(bad)
    with pytest.raises(GptsError, match="expected 1000"):
        load_tokenizer(tokenizer_json, vocab_size=1000)


def test_tokenizer_train_cli_builds_a_working_tokenizer(tmp_path, tiny_text) -> None:
    out = tmp_path / "tok.json"
    result = CliRunner().invoke(
        app, ["tokenizer", "train", "--data", str(tiny_text), "--out", str(out), "--vocab-size", "300"]
    )
    assert result.exit_code == 0, result.output
    trained = load_tokenizer(out, vocab_size=300)
    assert trained.token_to_id(EOT) == 0
    for text in ("The small model reads words.", TEXTS[6], TEXTS[7], TEXTS[8]):
        assert trained.decode(trained.encode(text).ids, skip_special_tokens=False) == text
    assert json.loads(out.read_text())["model"]["type"] == "BPE"
    assert not list(tmp_path.glob(".*tmp*"))


def test_tokenizer_train_on_too_little_text_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(GptsError, match="too small"):
        train_tokenizer(["tiny"], vocab_size=4096)
    result = CliRunner().invoke(
        app, ["tokenizer", "train", "--data", str(tmp_path / "none.txt"), "--out", str(tmp_path / "t.json")]
    )
    assert result.exit_code == 2 and "no such file" in result.stderr
