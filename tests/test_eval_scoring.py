"""Scoring of `gpts-edge eval`: log-likelihoods against a direct computation, batching, truncation,
acc vs acc_norm vs acc_bytes, and the CLI, on the tiny seeded checkpoint from conftest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from gpts_edge.cli import app
from gpts_edge.config import PRESETS
from gpts_edge.errors import GptsError
from gpts_edge.evaluate import Item, ItemScore, encode_choice, evaluate, read_mc, score_items, summarize
from gpts_edge.model import load_model
from gpts_edge.tokenizer import load_tokenizer
from gpts_edge.torch_runtime import TorchRuntime

ITEMS = [
    Item("Question: Which is hot?\nAnswer:", ("the sun", "ice cream in a freezer", "snow"), 0, "t:1"),
    Item("The cat sat on the", ("mat", "moon and the stars above", "chair"), 2, "t:2"),
    Item(
        "Roof shingle removal: A man is sitting on a roof. He",
        ("is using wrap.", "starts pulling up roofing."),
        1,
        "t:3",
    ),
    Item("1, 2, 3,", ("4", "5, 6, 7, 8, 9"), 0, "t:4"),
]


@pytest.fixture(scope="module")
def runtime(tiny_checkpoint: Path) -> TorchRuntime:
    return TorchRuntime(tiny_checkpoint)


def direct_loglik(model: torch.nn.Module, tok, context: str, continuation: str, ctx_len: int) -> float:
    """Reference: separate encodings, one unpadded sequence, float64 log_softmax in torch."""
    ctx, cont = tok.encode(context).ids, tok.encode(continuation).ids
    seq = (ctx + cont)[-(ctx_len + 1) :]
    with torch.no_grad():
        logits, _ = model(torch.tensor([seq[:-1]]))
    logp = torch.log_softmax(logits[0].double(), dim=-1)
    n = len(cont)
    return float(sum(logp[len(seq) - 1 - n + k, cont[k]] for k in range(n)))


def test_loglik_equals_direct_computation(runtime: TorchRuntime, tiny_checkpoint: Path) -> None:
    model = load_model(tiny_checkpoint)
    scores = score_items(runtime, ITEMS, batch_size=4)
    for item, s in zip(ITEMS, scores, strict=True):
        want = [direct_loglik(model, runtime.tokenizer, item.context, " " + c, 64) for c in item.choices]
        np.testing.assert_allclose(s.loglik, want, rtol=0, atol=1e-4)
        assert s.loglik.dtype == np.float64


def test_batch_size_does_not_change_logliks(runtime: TorchRuntime) -> None:
    one = score_items(runtime, ITEMS, batch_size=1)
    many = score_items(runtime, ITEMS, batch_size=3)
    for a, b in zip(one, many, strict=True):
        np.testing.assert_allclose(a.loglik, b.loglik, rtol=0, atol=1e-4)


def test_long_context_keeps_its_end_and_whole_continuation(
    runtime: TorchRuntime, tiny_checkpoint: Path
) -> None:
    tok = runtime.tokenizer
    context = " ".join(f"word{i}" for i in range(80)) + " and finally"
    inp, cont = encode_choice(tok, context, " the last words here", 64)
    whole = tok.encode(context + " the last words here").ids
    assert len(inp) == 64 and inp.tolist() == whole[-65:-1]
    assert cont.tolist() == whole[-len(cont) :]
    [score] = score_items(runtime, [Item(context, ("the last words here", "x"), 0, "t:1")])
    want = direct_loglik(load_model(tiny_checkpoint), tok, context, " the last words here", 64)
    assert abs(score.loglik[0] - want) < 1e-4


def test_continuation_longer_than_context_is_an_error(runtime: TorchRuntime) -> None:
    long_choice = " ".join(["word"] * 70)
    with pytest.raises(
        GptsError, match=r"t:9: a choice is \d+ tokens, longer than the model's context length 64"
    ):
        score_items(runtime, [Item("Q:", (long_choice, "no"), 0, "t:9")])


class UniformRuntime:
    """Every token equally likely: a choice's log-likelihood is -(its token count) * log(vocab)."""

    def __init__(self) -> None:
        from gpts_edge.checkpoint import default_model_dir

        self.config = PRESETS["tiny"]
        self.tokenizer = load_tokenizer(default_model_dir() / "tokenizer.json", self.config.vocab_size)

    def forward_logits(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        return np.zeros((*input_ids.shape, self.config.vocab_size), dtype=np.float32)


def test_acc_and_acc_norm_pick_different_choices_when_lengths_differ() -> None:
    rt = UniformRuntime()
    # " x": 1 token, 1 char; " the the the the the": 5 tokens, 19 chars. The sum favours the
    # short choice, the per-character average the long one.
    assert len(rt.tokenizer.encode(" the the the the the").ids) == 5
    items = [
        Item("Pick:", ("x", "the the the the the"), 1, "t:1"),
        Item("Pick:", ("x", "the the the the the"), 0, "t:2"),
    ]
    scores = score_items(rt, items)
    np.testing.assert_allclose(scores[0].loglik, [-np.log(4096), -5 * np.log(4096)])
    assert (scores[0].pred, scores[0].pred_norm) == (0, 1)
    result = summarize(scores)
    assert (result["acc"], result["acc_norm"], result["n"]) == (50.0, 50.0, 2)
    assert summarize(scores[:1])["acc"] == 0.0 and summarize(scores[:1])["acc_norm"] == 100.0


def test_acc_bytes_divides_by_utf8_length_acc_norm_by_characters() -> None:
    # "ééé": 3 characters, 6 bytes; "abcd": 4 and 4.
    s = ItemScore(np.array([-6.0, -7.0]), 0, np.array([3.0, 4.0]), np.array([6.0, 4.0]))
    assert (s.pred, s.pred_norm, s.pred_bytes) == (0, 1, 0)
    r = summarize([s])
    assert (r["acc"], r["acc_norm"], r["acc_bytes"]) == (100.0, 0.0, 100.0)


def test_chars_counted_without_the_leading_delimiter() -> None:
    [s] = score_items(UniformRuntime(), [Item("Q:", ("ééé", "abcd"), 0, "t:1")])
    assert s.chars.tolist() == [3.0, 4.0] and s.bytes.tolist() == [6.0, 4.0]


def write_mc(path: Path) -> Path:
    rows = [{"context": it.context, "choices": list(it.choices), "answer": it.gold} for it in ITEMS]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_evaluate_limit_and_report_fields(runtime: TorchRuntime, tmp_path: Path) -> None:
    data = write_mc(tmp_path / "set.jsonl")
    result = evaluate(runtime, ["mc"], data, limit=3, batch_size=2, progress=False)
    r = result["mc"]
    assert r["n"] == 3
    scores = score_items(runtime, read_mc(data)[:3])
    expected = summarize(scores)
    assert {k: r[k] for k in expected} == expected
    assert r["items_per_s"] > 0


def test_cli_eval_mc_json_matches_library(
    tiny_checkpoint: Path, runtime: TorchRuntime, tmp_path: Path
) -> None:
    data = write_mc(tmp_path / "set.jsonl")
    args = [
        "eval",
        "--task",
        "mc",
        "--data",
        str(data),
        "--model",
        str(tiny_checkpoint),
        "--json",
        "--batch-size",
        "2",
    ]
    proc = CliRunner().invoke(app, args)
    assert proc.exit_code == 0, proc.stderr
    out = json.loads(proc.stdout)
    expected = summarize(score_items(runtime, read_mc(data)))
    assert {k: out["mc"][k] for k in expected} == expected
    assert "items/s" in proc.stderr


def test_cli_eval_malformed_file_exits_2_naming_line(tiny_checkpoint: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"context": "c", "choices": ["a", "b"], "answer": 0}\n{"context": "c", "choices": "ab"}\n'
    )
    proc = CliRunner().invoke(
        app, ["eval", "--task", "mc", "--data", str(bad), "--model", str(tiny_checkpoint)]
    )
    assert proc.exit_code == 2
    assert f"error: {bad}:2: field 'choices'" in proc.stderr
    assert proc.exception is None or isinstance(proc.exception, SystemExit)


def test_leaderboard_index_normalises_each_task_against_chance_and_counts_arithmark_at_chance() -> None:
    from gpts_edge.evaluate import format_table, leaderboard_index

    results = {
        "hellaswag": {"acc": 30.0, "acc_norm": 40.0, "acc_bytes": 30.0, "n": 10},
        "arc_easy": {"acc": 30.0, "acc_norm": 55.0, "acc_bytes": 30.0, "n": 10},
        "arc_challenge": {"acc": 30.0, "acc_norm": 25.0, "acc_bytes": 30.0, "n": 10},
        "piqa": {"acc": 60.0, "acc_norm": 60.0, "acc_bytes": 60.0, "n": 10},
    }
    # hellaswag 100*15/75 = 20; arc (40 + 0) / 2 = 20; piqa 100*10/50 = 20; arithmark 0 (weight 0.65)
    assert leaderboard_index(results) == round(60 / 3.65, 2)
    assert "Open SLM Leaderboard index 16.44" in format_table(results)
    del results["piqa"]
    assert leaderboard_index(results) is None and "index" not in format_table(results)
