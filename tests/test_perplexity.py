"""``gpts-edge perplexity``: NLL, perplexity and bits per byte of a text under any runtime."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from gpts_edge.checkpoint import load_checkpoint
from gpts_edge.errors import GptsError
from gpts_edge.model import GPTS, weights_to_state
from gpts_edge.perplexity import score_file, windows
from gpts_edge.tokenizer import EOT_ID, load_tokenizer
from gpts_edge.torch_runtime import TorchRuntime


def run_cli(*args: object):
    """The CLI in this process (torch is already imported; a subprocess would pay it again)."""
    from typer.testing import CliRunner

    from gpts_edge.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    result.returncode = result.exit_code
    return result


FIXTURE = Path(__file__).parent / "data" / "uncle_wiggily.txt"


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    """About 500 tokens: longer than one 384-token window."""
    p = tmp_path_factory.mktemp("ppl") / "story.txt"
    p.write_text(FIXTURE.read_text(encoding="utf-8")[:2000], encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def torch_rt() -> TorchRuntime:
    return TorchRuntime(None)


def _hand_nll(text: str, stride: int) -> float:
    """Each target token's log-probability from a plain forward of its window: windows start at
    0, stride, 2*stride, ... and a token belongs to the first window that reaches it (the model is
    causal, so one forward per window gives every position's prediction)."""
    ckpt = load_checkpoint(None)
    model = GPTS(ckpt.config)
    model.load_state_dict(weights_to_state(ckpt.weights))
    model.eval()
    ids = [EOT_ID, *load_tokenizer(ckpt.tokenizer_path).encode(text).ids]
    n, ctx = len(ids) - 1, ckpt.config.context_length
    logp: dict[int, torch.Tensor] = {}
    total = 0.0
    with torch.no_grad():
        for p in range(1, n + 1):
            begin = 0
            while min(begin + ctx, n) < p:
                begin += stride
            if begin not in logp:
                logits, _ = model(torch.tensor([ids[begin : min(begin + ctx, n)]]))
                logp[begin] = torch.log_softmax(logits[0].double(), -1)
            total -= logp[begin][p - 1 - begin, ids[p]].item()
    return total


@pytest.mark.parametrize("stride", [384, 160])
def test_perplexity_equals_a_hand_computed_sum_of_log_probs(torch_rt, text_file, stride) -> None:
    score = score_file(torch_rt, text_file, stride)
    assert score.tokens > 384  # several windows
    expected = _hand_nll(text_file.read_text(encoding="utf-8"), stride)
    assert score.nll == pytest.approx(expected, rel=1e-6)
    d = score.as_dict()
    assert d["nll"] == pytest.approx(expected / score.tokens, rel=1e-6)
    assert d["perplexity"] == pytest.approx(math.exp(expected / score.tokens), rel=1e-6)
    assert d["bits_per_byte"] == pytest.approx(expected / math.log(2) / len(text_file.read_bytes()), rel=1e-6)


def test_windows_score_every_token_once() -> None:
    for n, ctx, stride in [(1, 384, 384), (384, 384, 384), (1000, 384, 384), (1000, 384, 100), (7, 4, 1)]:
        seen = [p for _, e, first in windows(n, ctx, stride) for p in range(first, e + 1)]
        assert seen == list(range(1, n + 1))
        assert all(e - b <= ctx and first > b for b, e, first in windows(n, ctx, stride))
    with pytest.raises(GptsError, match="--stride"):
        list(windows(10, 384, 0))


def test_torch_onnx_and_gguf_f32_agree(tmp_path, torch_rt, text_file) -> None:
    from gpts_edge.api import open_runtime
    from gpts_edge.export.gguf import export_gguf
    from gpts_edge.export.onnx import export_onnx

    (tmp_path / "onnx").mkdir()
    export_onnx(None, tmp_path / "onnx" / "model.onnx", log=lambda _m: None)
    export_gguf(None, tmp_path / "m.gguf", quant="f32", log=lambda _m: None)
    ref = score_file(torch_rt, text_file).nll
    for name, model in (("onnx", tmp_path / "onnx"), ("gguf", tmp_path / "m.gguf")):
        got = score_file(open_runtime(name, model), text_file).nll
        assert abs(got - ref) / ref < 1e-4, (name, got, ref)


def test_cli_json_gives_per_file_and_total(tmp_path, text_file) -> None:
    other = tmp_path / "other.txt"
    other.write_text("Nurse Jane Fuzzy Wuzzy made a cherry pie. ✓ done\n", encoding="utf-8")
    proc = run_cli("perplexity", text_file, other, "--runtime", "torch", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    files = report["files"]
    assert set(files) == {str(text_file), str(other)}
    for s in [*files.values(), report["total"]]:
        assert set(s) == {"tokens", "bytes", "nll", "perplexity", "bits_per_byte"}
        assert s["bits_per_byte"] == pytest.approx(s["nll"] * s["tokens"] / math.log(2) / s["bytes"])
    assert files[str(other)]["bytes"] == len(other.read_bytes())  # UTF-8 bytes, not characters
    total = report["total"]
    assert total["tokens"] == sum(s["tokens"] for s in files.values())
    total_nll = sum(s["nll"] * s["tokens"] for s in files.values())
    assert total["nll"] == pytest.approx(total_nll / total["tokens"])
    table = run_cli("perplexity", other, "--runtime", "torch")
    assert table.returncode == 0 and "bits/byte" in table.stdout
    for stride in ("0", "385"):
        bad = run_cli("perplexity", other, "--runtime", "torch", "--stride", stride)
        assert (
            bad.returncode == 2
            and f"--stride: expected 1..384 (the model's context), found {stride}" in bad.stderr
        )


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"", "empty"),
        (b"abc\x00def", "binary"),
        (b"caf\xe9 au lait", "not UTF-8 text (invalid byte at offset 3)"),
    ],
    ids=["empty", "binary", "latin-1"],
)
def test_bad_files_are_one_clear_error(tmp_path, content, needle) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    proc = run_cli("perplexity", bad, "--runtime", "torch")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}:") and needle in lines[0], proc.stderr
    assert proc.stdout == ""


def test_scores_are_finite_for_a_one_token_text(torch_rt, tmp_path) -> None:
    one = tmp_path / "one.txt"
    one.write_text("The", encoding="utf-8")
    s = score_file(torch_rt, one)
    assert s.tokens == 1 and np.isfinite(s.nll) and s.nll > 0
