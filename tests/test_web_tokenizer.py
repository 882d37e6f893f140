"""The browser's JavaScript BPE (examples/browser/tokenizer.js) encodes and decodes exactly as
the Python `tokenizers` library does with the same tokenizer.json."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from gpts_edge.tokenizer import StreamDecoder

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="node (Node.js) is not installed")

TEXTS = [
    "Once upon a time, there was a little robot.",
    "It's   a  test\n\n  with\tTabs and trailing spaces   ",
    "I'll don't we've THEY'RE you'd 's 'S",
    "héllo wörld ñ — “quoted” 日本語のテキスト 한국어 Ελληνικά русский עברית العربية",
    "emoji 😀👍🏽👨‍👩‍👧 flags 🇫🇷 keycap 1️⃣",
    "a\u0085b\ufeffc\u00a0d\u3000e\u2028f\u1680g",  # Unicode spaces where JS's \s and Oniguruma's differ
    "<|endoftext|>Once<|endoftext|> upon<|endoftext|><|endoftext|>",
    "123 4567 ½ ٣ Ⅻ 3.14159",
    "   ",
    " \n",
    "\r\n\r\n",
    "x  ",
    "\u200b\u200d zero-width e\u0301 combining",
    "ŉ İ ß ﬁ Å Ω",
    "code: def f(x):\n    return x**2  # done!",
    "",
]


def _run_js(texts: list[str], id_lists: list[list[int]], tokenizer: Path) -> dict:
    request = json.dumps({"tokenizer": str(tokenizer), "texts": texts, "ids": id_lists})
    proc = subprocess.run(
        ["node", str(REPO / "tests/js/tokenize_cases.mjs")],
        input=request,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _random_texts(n: int, seed: int) -> list[str]:
    """Mixed-script strings built from code points of many Unicode blocks."""
    rng = np.random.default_rng(seed)
    pools = [
        range(0x20, 0x7F),
        range(0xA0, 0x250),
        range(0x370, 0x530),
        range(0x4E00, 0x4E80),
        range(0x3040, 0x30FF),
        range(0x1F600, 0x1F650),
        range(0x2000, 0x2070),
        [9, 10, 13, 32, 32, 32, 39],
    ]
    out = []
    for _ in range(n):
        chars = []
        for _ in range(int(rng.integers(1, 40))):
            pool = pools[int(rng.integers(len(pools)))]
            chars.append(chr(int(pool[int(rng.integers(len(pool)))])))
        out.append("".join(chars))
    return out


def test_js_tokenizer_encodes_like_python_tokenizers(tokenizer_json: Path) -> None:
    tok = Tokenizer.from_file(str(tokenizer_json))
    texts = TEXTS + _random_texts(200, seed=0)
    expected = [tok.encode(t).ids for t in texts]
    got = _run_js(texts, [], tokenizer_json)["encoded"]
    bad = [(t, e, g) for t, e, g in zip(texts, expected, got, strict=True) if e != g]
    assert not bad, f"{len(bad)} of {len(texts)} texts differ (text, python, js): {bad[:3]}"


def test_js_tokenizer_decodes_like_python_tokenizers(tokenizer_json: Path) -> None:
    tok = Tokenizer.from_file(str(tokenizer_json))
    rng = np.random.default_rng(1)
    # Arbitrary id sequences include ones that cut UTF-8 characters in half: both sides must
    # put U+FFFD in the same places.
    id_lists = [tok.encode(t).ids for t in TEXTS]
    id_lists += [
        [int(i) for i in rng.integers(0, tok.get_vocab_size(), size=int(rng.integers(1, 30)))]
        for _ in range(200)
    ]
    expected = [tok.decode(ids, skip_special_tokens=False) for ids in id_lists]
    got = _run_js([], id_lists, tokenizer_json)
    assert got["decoded"] == expected
    assert any("\ufffd" in e for e in expected)
    for ids, pieces in zip(id_lists, got["streamed"], strict=True):
        dec = StreamDecoder(tok)
        assert pieces == [*(dec.push(i) for i in ids), dec.flush()]


def test_js_tokenizer_round_trips_text(tokenizer_json: Path) -> None:
    got = _run_js(TEXTS, [], tokenizer_json)
    again = _run_js([], got["encoded"], tokenizer_json)
    assert again["decoded"] == TEXTS
