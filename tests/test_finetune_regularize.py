"""The fine-tune's levers against over-fitting (training/regularize.py, the model's dropout):
each one's behaviour on small CPU runs, with the real trainer where the checkpoint is involved."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gpts_edge.checkpoint import load_checkpoint
from gpts_edge.config import PRESETS
from gpts_edge.errors import GptsError
from gpts_edge.model import GPTS, weights_to_state
from gpts_edge.training import calibrate, regularize
from gpts_edge.training.data import Source, make_sampler
from gpts_edge.training.train import Trainer, preset_config
from tests.conftest import run_cli

FIXTURE = Path(__file__).parent / "data" / "uncle_wiggily.txt"
FAST = {"init": "default", "data": [str(FIXTURE)], "batch_size": 4, "seq_len": 64, "progress": False}


def _tiny(dropout: float = 0.0) -> GPTS:
    return GPTS(PRESETS["tiny"], dropout=dropout).init_weights(0)


def test_dropout_is_off_in_eval_mode_and_changes_only_training_forwards() -> None:
    ids = torch.randint(0, PRESETS["tiny"].vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    plain, dropped = _tiny(0.0).eval(), _tiny(0.3).eval()
    with torch.no_grad():
        assert torch.equal(plain(ids)[0], dropped(ids)[0])  # bit for bit at inference
        dropped.train()
        assert not torch.allclose(plain(ids)[0], dropped(ids)[0])
        plain.train()  # dropout 0 in train mode: the same numbers as eval
        assert torch.equal(plain(ids)[0], plain.eval()(ids)[0])


def test_dropout_is_not_part_of_the_saved_model_config(tmp_path) -> None:
    Trainer(preset_config(None, out=str(tmp_path / "r"), max_steps=1, dropout=0.2, **FAST)).train()
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert "dropout" not in json.dumps(config)
    assert load_checkpoint(tmp_path / "r").config == load_checkpoint(None).config


def test_ema_update_is_the_exponential_average_and_swapping_restores_the_weights() -> None:
    model = _tiny()
    ema = regularize.WeightEMA(model, 0.9)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for n, p in model.named_parameters():
        torch.testing.assert_close(ema.tensors()[n], 0.9 * start[n] + 0.1 * p.detach(), rtol=0, atol=1e-6)
    raw = {n: p.detach().clone() for n, p in model.named_parameters()}
    with ema.swapped_in(model):
        assert all(torch.equal(p, ema.tensors()[n]) for n, p in model.named_parameters())
    assert all(torch.equal(p, raw[n]) for n, p in model.named_parameters())


def test_ema_is_validated_and_the_kept_checkpoint_is_the_better_of_raw_and_ema(tmp_path) -> None:
    out = tmp_path / "ema"
    t = Trainer(
        preset_config(
            None, out=str(out), max_steps=6, eval_every=3, ema=0.8, lr=3e-3, calibrate=False, **FAST
        )
    )
    result = t.train()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 3, 6] and all("ema_val_loss" in r for r in evals)
    assert evals[-1]["ema_val_loss"] != evals[-1]["val_loss"]  # the average is not the raw weights
    ema_final = t.ema.tensors()
    raw_final = {n: p.detach() for n, p in t.model.named_parameters()}
    assert any(not torch.equal(ema_final[n], raw_final[n]) for n in raw_final)

    best = min((r[k], r["step"], k) for r in evals for k in ("val_loss", "ema_val_loss"))
    assert result["best_val_loss"] == best[0] and result["best_step"] == best[1]
    # The top level holds exactly the weights that scored best: evaluate them afresh.
    kept = weights_to_state(load_checkpoint(out).weights)
    t.model.load_state_dict(kept)
    assert abs(t.evaluate() - best[0]) < 1e-5
    if best[1] == 6:
        expected = ema_final if best[2] == "ema_val_loss" else raw_final
        assert all(torch.equal(kept[n], expected[n].cpu()) for n in expected)
    # A snapshot carries the average for --resume.
    snap = sorted((out / "checkpoints").glob("step-*"))[-1]
    assert (snap / "ema.safetensors").is_file()


def test_ema_resumes_from_the_snapshot(tmp_path) -> None:
    opts = {"max_steps": 4, "ema": 0.5, "ckpt_every": 2, "keep": "last", **FAST}
    whole = Trainer(preset_config(None, out=str(tmp_path / "whole"), **opts))
    whole.train()
    Trainer(preset_config(None, out=str(tmp_path / "cut"), stop_at=2, **opts)).train()
    resumed = Trainer(preset_config(None, out=str(tmp_path / "cut"), resume=True, **opts))
    resumed.train()
    for n, s in whole.ema.tensors().items():
        torch.testing.assert_close(resumed.ema.tensors()[n], s, rtol=0, atol=1e-6)


def test_frozen_embedding_keeps_its_weights_and_a_scale_divides_its_lr(tmp_path) -> None:
    start = load_checkpoint(None).weights
    t = Trainer(preset_config(None, out=str(tmp_path / "frozen"), max_steps=2, embed_lr_scale=0.0, **FAST))
    t.train()
    got = {n: p.detach().numpy() for n, p in t.model.named_parameters()}
    assert np.array_equal(got[regularize.EMBED], start["model." + regularize.EMBED])
    assert not np.array_equal(got["layers.0.mlp.up_proj.weight"], start["model.layers.0.mlp.up_proj.weight"])

    half = Trainer(preset_config(None, out=str(tmp_path / "half"), max_steps=1, embed_lr_scale=0.25, **FAST))
    regularize.set_lr(half.opt, 1e-3)
    lrs = {id(p): g["lr"] for g in half.opt.param_groups for p in g["params"]}
    assert lrs[id(half.model.embed_tokens.weight)] == 0.25e-3
    assert lrs[id(half.model.layers[0].mlp.up_proj.weight)] == 1e-3


def test_decay_to_init_pulls_toward_the_initial_weights_not_zero() -> None:
    lr, wd, delta = 0.1, 2.0, 0.5
    for to_init in (False, True):
        model = _tiny()
        opt, _ = regularize.optimizer(model, lr=lr, weight_decay=wd, betas=(0.9, 0.95))
        anchor = regularize.DecayToInit(opt, regularize.initial_copies(model)) if to_init else None
        p = model.layers[0].mlp.up_proj.weight
        p0 = p.detach().clone()
        with torch.no_grad():
            p.add_(delta)
        for q in model.parameters():
            q.grad = torch.zeros_like(q)  # no gradient: only the weight decay moves the weights
        opt.step()
        if anchor is not None:
            anchor.after_step()
        expected = p0 + delta * (1 - lr * wd) if to_init else (p0 + delta) * (1 - lr * wd)
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-6)


def test_fitted_temperature_recovers_the_temperature_that_made_the_data() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(20_000, 50, generator=gen) * 3
    targets = torch.multinomial(torch.softmax(logits / 1.5, -1), 1, generator=gen).squeeze(1)
    t, before, after = calibrate.fit_temperature(logits, targets)
    assert abs(t - 1.5) < 0.05, t
    assert after < before


def test_calibration_folds_the_temperature_into_the_final_norm(tmp_path) -> None:
    out = tmp_path / "cal"
    result = Trainer(
        preset_config(None, out=str(out), max_steps=3, keep="last", calibrate=True, lr=3e-3, **FAST)
    ).train()
    t = result["temperature"]
    assert t != 1.0
    snap = load_checkpoint(sorted((out / "checkpoints").glob("step-*"))[-1])  # the weights as trained
    top = load_checkpoint(out)
    for name, w in snap.weights.items():
        expected = w / np.float32(t) if name == calibrate.NORM else w
        np.testing.assert_allclose(top.weights[name], expected, rtol=1e-4, atol=0)
    ids = torch.tensor([[5, 17, 300, 42, 7, 99]])
    raw, cal = GPTS(snap.config), GPTS(top.config)
    raw.load_state_dict(weights_to_state(snap.weights))
    cal.load_state_dict(weights_to_state(top.weights))
    with torch.no_grad():
        torch.testing.assert_close(cal.eval()(ids)[0], raw.eval()(ids)[0] / t, rtol=1e-3, atol=1e-4)


def test_the_finetune_preset_calibrates_in_passes_and_the_cli_can_turn_calibration_off(tmp_path) -> None:
    assert preset_config(None, init="default").calibrate is True
    assert preset_config("tiny").calibrate is False
    assert preset_config(None, init="default").sampling == "passes"  # and random windows otherwise
    assert preset_config("gpt-s-1.4m").sampling == "random"
    short = tmp_path / "note.txt"  # shorter than a window: a fast step
    short.write_text(FIXTURE.read_text(encoding="utf-8")[:1500], encoding="utf-8")

    def run(name: str, *extra: str):
        args = ["--init", "default", "--data", short, "--out", tmp_path / name, "--max-steps", "1"]
        proc = run_cli("train", *args, "--no-progress", *extra)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout

    off = run("off", "--no-calibrate", "--sampling", "random")
    assert "calibration:" not in off and "temperature" not in off.splitlines()[-1]
    on = run("on")
    assert "calibration: temperature" in on and "temperature" in on.splitlines()[-1]
    for name, sampling in (("off", "random"), ("on", "passes")):
        state = sorted((tmp_path / name / "checkpoints").glob("step-*/train_state.json"))[-1]
        assert json.loads(state.read_text())["train_config"]["sampling"] == sampling


def _source(n: int) -> Source:
    return Source("s", 1.0, np.arange(n, dtype=np.uint16), np.arange(5, dtype=np.uint16))


def test_passes_train_on_every_token_once_per_pass_and_resume_exactly() -> None:
    # 1000 tokens in windows of 16 from a random offset below 16: 61 or 62 windows a pass.
    sampler = make_sampler("passes", [_source(1000)], seq_len=16, seed=3)
    windows = [row for _ in range(10) for row in sampler.batch(13)]  # 130 windows: two passes and more
    one_pass = np.concatenate([w[:-1] for w in windows[:61]])
    assert len(np.unique(one_pass)) == 61 * 16  # no token twice within a pass
    random_windows = make_sampler("random", [_source(1000)], seq_len=16, seed=3)
    drawn = np.concatenate([w[:-1] for w in random_windows.batch(61)])
    assert len(np.unique(drawn)) < 61 * 16  # independent random windows overlap
    state = json.loads(json.dumps(sampler.state()))  # what train_state.json holds
    ahead = [sampler.batch(7) for _ in range(12)]  # crosses into the next pass
    again = make_sampler("passes", [_source(1000)], seq_len=16, seed=3)
    again.set_state(state)
    for expected in ahead:
        assert np.array_equal(again.batch(7), expected)


def test_unknown_sampling_or_a_snapshot_of_the_other_kind_is_a_clear_error() -> None:
    with pytest.raises(GptsError, match="--sampling: expected random or passes"):
        make_sampler("shuffled", [_source(100)], seq_len=16, seed=0)
    random_state = make_sampler("random", [_source(100)], seq_len=16, seed=0).state()
    passes_state = make_sampler("passes", [_source(100)], seq_len=16, seed=0).state()
    with pytest.raises(GptsError, match="written with --sampling random"):
        make_sampler("passes", [_source(100)], seq_len=16, seed=0).set_state(random_state)
    with pytest.raises(GptsError, match="written with --sampling passes"):
        make_sampler("random", [_source(100)], seq_len=16, seed=0).set_state(passes_state)
