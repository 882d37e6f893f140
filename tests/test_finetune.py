"""``train --init``: fine-tuning the bundled model on a user's own text.

Fixture ``tests/data/uncle_wiggily.txt`` (45 KB): stories from Howard R. Garis's *Uncle Wiggily*
books (1910s), Project Gutenberg texts, public domain in the USA; taken from the project's
``gutenberg-01`` corpus shard (the chunks that mention Uncle Wiggily), a domain the bundled model
did not train on.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from gpts_edge.checkpoint import default_model_dir, load_checkpoint
from gpts_edge.errors import GptsError
from gpts_edge.model import state_to_weights
from gpts_edge.perplexity import score_file
from gpts_edge.torch_runtime import TorchRuntime
from gpts_edge.training.finetune import cpu_micro_batch
from gpts_edge.training.train import Trainer, preset_config, train
from tests.conftest import run_cli

FIXTURE = Path(__file__).parent / "data" / "uncle_wiggily.txt"
# Small windows keep the test in seconds on a shared 2-core CPU.
FAST = {"batch_size": 8, "seq_len": 128, "progress": False}


@pytest.fixture(scope="module")
def domain(tmp_path_factory) -> tuple[Path, Path]:
    """The fixture split into a training text and a held-out text the run never sees."""
    text = FIXTURE.read_text(encoding="utf-8")
    cut = text.index("\n", int(len(text) * 0.8))
    d = tmp_path_factory.mktemp("domain")
    (d / "train.txt").write_text(text[:cut], encoding="utf-8")
    (d / "heldout.txt").write_text(text[cut + 1 :], encoding="utf-8")
    return d / "train.txt", d / "heldout.txt"


def _weights(trainer: Trainer) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in state_to_weights(trainer.model).items()}


def test_finetune_lowers_heldout_perplexity_and_validation_loss(tmp_path, domain) -> None:
    train_txt, heldout = domain
    out = tmp_path / "ft"
    result = train(
        preset_config(None, init="default", data=[str(train_txt)], out=str(out), max_steps=30, **FAST)
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert rows[0]["step"] == 0 and len(vals) >= 5  # the starting point, then ~10 evaluations
    assert vals[-1] < vals[0] - 0.1, vals

    before = score_file(TorchRuntime(default_model_dir()), heldout).as_dict()["bits_per_byte"]
    after = score_file(TorchRuntime(out), heldout).as_dict()["bits_per_byte"]
    assert after < 0.95 * before, (before, after)
    # --keep best (the finetune preset): the top level holds the best evaluated weights.
    assert result["best_val_loss"] == min(vals)


def test_init_from_gguf_and_hf_folder_gives_the_checkpoint_weights(tmp_path, domain) -> None:
    from gpts_edge.export.gguf import export_gguf
    from gpts_edge.export.hf import export_hf

    gguf = export_gguf(None, tmp_path / "m.gguf", quant="f32", log=lambda _m: None)
    hf = export_hf(None, tmp_path / "hf", log=lambda _m: None)
    reference = load_checkpoint(None).weights
    for source in (gguf, hf):
        out = tmp_path / f"run-{source.name}"
        t = Trainer(preset_config(None, init=str(source), data=[str(domain[0])], out=str(out), max_steps=1))
        got = _weights(t)
        assert got.keys() == reference.keys()
        for name, w in reference.items():
            assert np.array_equal(got[name], w), (source, name)
        assert t.cfg == load_checkpoint(None).config
        assert load_checkpoint(out / "init").config == t.cfg  # the imported start beside the run


def test_conflicting_preset_or_tokenizer_is_an_error_naming_both(tmp_path, domain) -> None:
    data = [str(domain[0])]
    with pytest.raises(GptsError) as err:
        Trainer(preset_config("tiny", init="default", data=data, out=str(tmp_path / "a"), max_steps=1))
    assert "--preset tiny" in str(err.value) and "--init default" in str(err.value)

    tok = json.loads((default_model_dir() / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = "the", "and"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    other = tmp_path / "other-tokenizer.json"
    other.write_text(json.dumps(tok))
    with pytest.raises(GptsError) as err:
        Trainer(
            preset_config(
                None, init="default", tokenizer=str(other), data=data, out=str(tmp_path / "b"), max_steps=1
            )
        )
    assert f"--tokenizer {other}" in str(err.value) and "--init default" in str(err.value)
    # The pretraining preset names the same model config: continued pretraining is allowed.
    t = Trainer(preset_config("gpt-s-1.4m", init="default", data=data, out=str(tmp_path / "c"), max_steps=1))
    assert t.tc.preset == "gpt-s-1.4m"


def test_bad_init_is_a_clear_error(tmp_path, domain) -> None:
    data = [str(domain[0])]
    with pytest.raises(GptsError, match="no such file or directory"):
        Trainer(preset_config(None, init=str(tmp_path / "nope"), data=data, out=str(tmp_path / "a")))
    with pytest.raises(GptsError, match="needs --init"):
        Trainer(preset_config("finetune", data=data, out=str(tmp_path / "b"), max_steps=1))


def test_a_bad_sampling_or_keep_is_refused_before_anything_is_written(tmp_path, domain) -> None:
    data = [str(domain[0])]
    for bad, match in (
        (dict(sampling="shuffled"), "--sampling: expected random or passes, found 'shuffled'"),
        (dict(keep="first"), "--keep: expected best or last, found 'first'"),
    ):
        out = tmp_path / "run"
        with pytest.raises(GptsError, match=match):
            Trainer(preset_config(None, init="default", data=data, out=str(out), max_steps=1, **bad))
        assert not out.exists()  # no data cache, no half-made run folder


def test_epochs_set_the_steps_and_the_tail_is_held_out(tmp_path, domain) -> None:
    t = Trainer(
        preset_config(None, init="default", data=[str(domain[0])], out=str(tmp_path / "r"), epochs=2, **FAST)
    )
    n_train = sum(len(s.train) for s in t.sources)
    n_val = sum(len(s.val) for s in t.sources)
    assert t.max_steps == math.ceil(2 * n_train / (8 * 128))
    assert abs(n_val / (n_train + n_val) - 0.05) < 0.001  # the finetune preset's --val-fraction
    # Validation windows come from the held-out tail only.
    tail = t.sources[0].val
    for row in t.val.numpy():
        starts = [i for i in range(len(tail) - len(row) + 1) if np.array_equal(tail[i : i + len(row)], row)]
        assert starts


def test_keep_last_and_keep_best_choose_the_top_level_weights(tmp_path, domain) -> None:
    # An absurd learning rate makes every step worse than the start: best is the initial model.
    # (No calibration: it would rescale the final norm of the kept weights; tested on its own.)
    opts = {"init": "default", "data": [str(domain[0])], "max_steps": 4, "lr": 0.5, "warmup": 1, **FAST}
    opts["calibrate"] = False
    best = train(preset_config(None, out=str(tmp_path / "best"), keep="best", **opts))
    last = train(preset_config(None, out=str(tmp_path / "last"), keep="last", **opts))
    assert best["best_step"] == 0
    start = load_checkpoint(None).weights
    kept = load_checkpoint(tmp_path / "best").weights
    assert all(np.array_equal(kept[k], start[k]) for k in start)
    final = load_checkpoint(tmp_path / "last").weights
    snap = load_checkpoint(sorted((tmp_path / "last" / "checkpoints").glob("step-*"))[-1]).weights
    assert all(np.array_equal(final[k], snap[k]) for k in snap)
    assert not all(np.array_equal(final[k], start[k]) for k in start)
    assert last["step"] == 4


def test_text_shorter_than_a_window_trains_with_a_warning_and_shows_progress(tmp_path) -> None:
    short = tmp_path / "note.txt"
    short.write_text("Uncle Wiggily put on his tall silk hat and hopped away to find an adventure. " * 3)
    out = tmp_path / "short"
    proc = run_cli("train", "--init", "default", "--data", short, "--out", out, "--max-steps", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "warning: the training text has only" in proc.stdout
    assert "training 2 steps of 8 x 1 x" in proc.stdout
    assert "0/2" in proc.stderr and "val=" in proc.stderr  # the bar is up before the first step
    load_checkpoint(out)


def test_cpu_runs_large_batches_as_micro_batches_with_the_same_step(tmp_path, tiny_text, capsys) -> None:
    assert cpu_micro_batch(256, 3, 16) == (16, 48)
    assert cpu_micro_batch(24, 1, 16) == (12, 2)
    assert cpu_micro_batch(8, 1, 16) == (8, 1)
    tc = preset_config("tiny", data=[str(tiny_text)], out=str(tmp_path / "r"), batch_size=32, max_steps=1)
    t = Trainer(tc)
    assert (t.tc.batch_size, t.tc.grad_accum) == (16, 2)
    assert t.tokens_per_step == 32 * 64
    assert "micro-batches of 16 x 2" in capsys.readouterr().out
