"""The tokenizer rebuilt from a GGUF's tokenizer.ggml.* fields behaves exactly like tokenizer.json."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("gguf")

from gpts_edge.export.gguf import export_gguf  # noqa: E402
from gpts_edge.runtimes.gguf import GGUFRuntime  # noqa: E402
from gpts_edge.tokenizer import load_tokenizer  # noqa: E402

TEXTS = [
    "",
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "  leading spaces, trailing spaces   ",
    "tabs\tand\nnewlines\r\nand\n\n\nblank lines",
    "naïve café résumé façade jalapeño Ærøskøbing Straße",
    "Ελληνικά, русский текст, українська",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "العربية من اليمين إلى اليسار עברית",
    "emoji 🙂🚀 family 👨‍👩‍👧‍👦 flag 🇫🇷 skin 👍🏽",
    "combining: e\u0301 a\u0308 n\u0303 and zero\u200bwidth\u200djoiner",
    "math ∑∫√∞ ≠ ≤ ≥ and arrows → ← ⇒",
    "<|endoftext|>special in the middle<|endoftext|>",
    "code: def f(x):\n    return x ** 2  # comment {'a': [1, 2, 3]}",
    "numbers 1234567890 3.14159 -42 1e-6 0x1F",
    "control \x00\x01\x7f and replacement \ufffd chars",
    "Once upon a time, there was a little girl named Lily. She loved to play outside.",
]


@pytest.fixture(scope="session")
def gguf_runtime(tiny_checkpoint, tmp_path_factory):
    path = export_gguf(tiny_checkpoint, tmp_path_factory.mktemp("gguf") / "tok.gguf", log=lambda m: None)
    return GGUFRuntime(path)


@pytest.mark.parametrize("text", TEXTS)
def test_embedded_tokenizer_encodes_and_decodes_like_tokenizer_json(gguf_runtime, tokenizer_json, text):
    ref, tok = load_tokenizer(tokenizer_json), gguf_runtime.tokenizer
    ids = ref.encode(text).ids
    assert tok.encode(text).ids == ids
    assert tok.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False) == text


def test_embedded_tokenizer_has_the_same_vocabulary_merges_and_specials(gguf_runtime, tokenizer_json):
    ref = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    got = json.loads(gguf_runtime.tokenizer_json)
    assert got["model"]["vocab"] == ref["model"]["vocab"]
    ref_merges = [m if isinstance(m, list) else m.split(" ") for m in ref["model"]["merges"]]
    assert got["model"]["merges"] == ref_merges
    assert [(t["id"], t["content"], t["special"]) for t in got["added_tokens"]] == [
        (t["id"], t["content"], t["special"]) for t in ref["added_tokens"]
    ]
    assert got["pre_tokenizer"] == ref["pre_tokenizer"]


def test_every_single_token_decodes_like_tokenizer_json(gguf_runtime, tokenizer_json):
    ref, tok = load_tokenizer(tokenizer_json), gguf_runtime.tokenizer
    ids = list(range(ref.get_vocab_size()))
    assert [tok.id_to_token(i) for i in ids] == [ref.id_to_token(i) for i in ids]
    assert tok.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)
