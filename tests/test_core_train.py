"""The trainer on the ``tiny`` preset: exact resume, SIGKILL safety, metrics and plot, data
sources and mixing weights, clear errors, DDP with two gloo processes."""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gpts_edge.checkpoint import load_checkpoint
from gpts_edge.config import PRESETS
from gpts_edge.errors import GptsError
from gpts_edge.tokenizer import EOT_ID, load_tokenizer
from gpts_edge.training.data import Sampler, load_sources, parse_data_spec
from gpts_edge.training.train import preset_config, train
from tests.conftest import REPO, write_text_corpus

# Resume tolerance: losses are logged rounded to 6 decimals and must agree to 1e-6 (exact in
# practice: same process, same ops, same order); the final weights must agree to 1e-6.
LOSS_TOL = 1e-6
WEIGHT_TOL = 1e-6
STEPS = 60


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model trains faster on one thread; CI has two cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _run(out: Path, data: list[str], **kw) -> dict:
    opts = {"max_steps": STEPS, "log_every": 1, "eval_every": 30, "progress": False, **kw}
    return train(preset_config("tiny", data=data, out=str(out), **opts))


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _metrics(out)}  # a re-run step keeps its last record


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, tiny_text) -> Path:
    out = tmp_path_factory.mktemp("train") / "straight"
    _run(out, [str(tiny_text)])
    return out


def test_resumed_run_gives_the_same_losses_as_a_straight_run(tmp_path, tiny_text, straight_run) -> None:
    out = tmp_path / "split"
    first = _run(out, [str(tiny_text)], stop_at=40)
    assert first["step"] == 40
    assert max(_losses(out)) == 40
    second = _run(out, [str(tiny_text)], resume=True)
    assert second["step"] == STEPS

    straight, split = _losses(straight_run), _losses(out)
    assert sorted(split) == sorted(straight) == list(range(1, STEPS + 1))
    worst = max(abs(straight[s] - split[s]) for s in straight)
    assert worst <= LOSS_TOL, f"max |loss diff| {worst}"
    # Not a trivially flat curve: the model learns.
    assert straight[STEPS] < straight[1] - 2.0

    a, b = load_checkpoint(straight_run).weights, load_checkpoint(out).weights
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= WEIGHT_TOL


def test_metrics_have_the_required_fields_and_a_loss_plot(straight_run) -> None:
    rows = _metrics(straight_run)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        for key in ("step", "loss", "lr", "tokens", "tokens_per_s"):
            assert isinstance(r[key], (int, float)), (key, r)
        assert r["tokens"] == r["step"] * 8 * 64  # tiny: batch 8 x context 64
    evaluated = [r["step"] for r in rows if "val_loss" in r]
    assert evaluated == [30, 60]
    assert all(np.isfinite(r["val_loss"]) and r["val_loss"] > 0 for r in rows if "val_loss" in r)
    # Warmup-stable-decay: 10 warmup steps to the peak, decay over the last 20 %.
    lr = {r["step"]: r["lr"] for r in rows}
    assert (
        lr[1] == pytest.approx(3e-3 / 10) and lr[10] == pytest.approx(3e-3) and lr[48] == pytest.approx(3e-3)
    )
    assert lr[STEPS] < lr[55] < 3e-3
    png = (straight_run / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_run_directory_is_a_checkpoint_with_resume_state(straight_run) -> None:
    ckpt = load_checkpoint(straight_run)
    assert ckpt.config == PRESETS["tiny"]
    snaps = sorted((straight_run / "checkpoints").iterdir())
    assert [s.name for s in snaps][-1] == f"step-{STEPS:07d}"
    state = json.loads((snaps[-1] / "train_state.json").read_text())
    assert state["step"] == STEPS and state["tokens"] == STEPS * 8 * 64 and state["world_size"] == 1
    assert (snaps[-1] / "optimizer.safetensors").is_file()
    assert len(snaps) <= 2  # keep_snapshots


def test_fresh_run_into_a_used_directory_is_refused(straight_run, tiny_text) -> None:
    with pytest.raises(GptsError, match="--resume"):
        _run(straight_run, [str(tiny_text)])


def test_resume_without_snapshots_is_refused(tmp_path, tiny_text) -> None:
    with pytest.raises(GptsError, match="no checkpoint snapshot"):
        _run(tmp_path / "empty", [str(tiny_text)], resume=True)


# --- SIGKILL ------------------------------------------------------------------------------------
def _loadable_everywhere(out: Path) -> list[Path]:
    """Every snapshot and (once it has a config.json) the top level load as checkpoints."""
    snaps = sorted(p for p in (out / "checkpoints").glob("step-*"))
    for s in snaps:
        load_checkpoint(s)
        assert (s / "train_state.json").is_file() and (s / "optimizer.safetensors").is_file()
    if (out / "config.json").exists():
        load_checkpoint(out)
    return snaps


def test_sigkilled_run_resumes_and_never_leaves_a_half_written_checkpoint(
    tmp_path, tiny_text, straight_run
) -> None:
    out = tmp_path / "killed"
    ckpt_every = 5
    cmd = [
        sys.executable,
        "-m",
        "gpts_edge.cli",
        "train",
        "--preset",
        "tiny",
        "--data",
        str(tiny_text),
        "--out",
        str(out),
        "--max-steps",
        str(STEPS),
        "--log-every",
        "1",
        "--eval-every",
        "30",
        "--ckpt-every",
        str(ckpt_every),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not list((out / "checkpoints").glob("step-*")):
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.time() < deadline, "no snapshot within 120 s"
            time.sleep(0.02)
        # A random moment after the first snapshot: snapshot writes happen every 5 steps, so
        # over the test's history the kill lands both inside and outside of them.
        time.sleep(random.uniform(0.0, 0.25))
        proc.send_signal(signal.SIGKILL)
    finally:
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert "loss=" in stderr and "tok_s=" in stderr  # the progress bar

    snaps = _loadable_everywhere(out)
    assert snaps, "the first snapshot vanished"
    last_logged = max(_losses(out))
    newest = int(snaps[-1].name.split("-")[1])
    assert last_logged - newest <= ckpt_every  # at most one checkpoint interval is lost

    # Resume in this process (the torch import is already paid) to the end of the run.
    result = train(
        preset_config(
            "tiny",
            data=[str(tiny_text)],
            out=str(out),
            max_steps=STEPS,
            log_every=1,
            eval_every=30,
            ckpt_every=ckpt_every,
            progress=False,
            resume=True,
        )
    )
    assert result["step"] == STEPS
    _loadable_everywhere(out)
    assert not list((out / "checkpoints").glob(".tmp-*")), "a temporary snapshot was left behind"
    # Killed and resumed ends where the uninterrupted run ended (the subprocess may have run
    # with another thread count, so not bit for bit).
    a, b = load_checkpoint(straight_run).weights, load_checkpoint(out).weights
    worst = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    assert worst <= 1e-4, worst
    straight, resumed = _losses(straight_run), _losses(out)
    assert max(abs(straight[s] - resumed[s]) for s in straight) <= 1e-4


FS_OPS = ((os, "replace"), (os, "rename"), (shutil, "copyfile"), (shutil, "rmtree"), (os, "unlink"))
SWEEP = {
    "max_steps": 3,
    "ckpt_every": 1,
    "eval_every": 100,
    "log_every": 1,
    "keep_snapshots": 1,
    "progress": False,
}


def _die_in_child(out: Path, data: Path, die_at: int | None, log: Path | None = None) -> int:
    """Train in a forked child that calls os._exit (no cleanup, like SIGKILL) just before its
    ``die_at``-th file-system operation; with ``log``, record the operations instead."""
    pid = os.fork()
    if pid == 0:  # the child
        code = 0
        try:
            count = [0]
            for mod, name in FS_OPS:
                real = getattr(mod, name)

                def wrapped(*a, _real=real, _name=name, **k):
                    count[0] += 1
                    if log is not None:
                        with open(log, "a") as fh:
                            fh.write(f"{_name} {a[0] if _name in ('rmtree', 'unlink') else a[-1]}\n")
                    if count[0] == die_at:
                        os._exit(137)
                    return _real(*a, **k)

                setattr(mod, name, wrapped)
            train(preset_config("tiny", data=[str(data)], out=str(out), **SWEEP))
        except BaseException:
            code = 1
        os._exit(code)
    deadline = time.time() + 120
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.time() > deadline:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError("the forked training run hung")
        time.sleep(0.01)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_death_at_each_checkpoint_write_leaves_only_whole_checkpoints(tmp_path, tiny_text) -> None:
    """Deterministic complement to the SIGKILL test: die just before each rename/replace that
    publishes a snapshot, mirrors it to the top level or prunes an old one, in the first two
    saves (the first fills an empty top level, the second overwrites and prunes). Everything on
    disk must load, and resuming must end exactly where an uninterrupted run ends."""
    ref, log = tmp_path / "ref", tmp_path / "ops.txt"
    assert _die_in_child(ref, tiny_text, None, log) == 0
    final = load_checkpoint(ref).weights
    ops = log.read_text().splitlines()
    second_prune = [i for i, op in enumerate(ops) if op.startswith("rmtree")][0]
    # Operations inside a snapshot's temporary directory all happen before the snapshot exists:
    # dying before its rename covers them. Dying before a copyfile equals dying after the
    # preceding replace. loss.png is not part of a checkpoint.
    points = [
        i + 1
        for i, op in enumerate(ops[: second_prune + 1])
        if op.split(" ")[0] in ("rename", "replace", "rmtree")
        and "data-cache" not in op
        and "loss.png" not in op
        and ("/.tmp-" not in op or "delete" in op)
    ]
    # And in the middle of deleting the pruned snapshot (two of its files gone, the rest not).
    points.append([i + 1 for i, op in enumerate(ops) if i > second_prune and op.startswith("unlink")][2])
    assert len(points) >= 10, ops
    for n in points:
        where = ops[n - 1]
        out = tmp_path / f"die-{n}"
        assert _die_in_child(out, tiny_text, n) == 137, f"did not die before {where}"
        try:
            _loadable_everywhere(out)
        except GptsError as exc:
            raise AssertionError(f"died before {where}: {exc}") from None
        resume = bool(list((out / "checkpoints").glob("step-*")))
        train(preset_config("tiny", data=[str(tiny_text)], out=str(out), resume=resume, **SWEEP))
        _loadable_everywhere(out)
        got = load_checkpoint(out).weights
        worst = max(float(np.abs(final[k] - got[k]).max()) for k in final)
        assert worst <= WEIGHT_TOL, f"died before {where}: resumed weights differ by {worst}"
        assert not list((out / "checkpoints").glob(".tmp-*")), f"died before {where}: temp dir left"


# --- data ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    write_text_corpus(d / "a.txt", n_docs=10, seed=1)
    docs = [f"Document number {i} talks about birds, trees and the sea. " * 8 for i in range(30)]
    with open(d / "b.jsonl", "w", encoding="utf-8") as fh:
        for t in docs:
            fh.write(json.dumps({"text": t, "id": 1}) + "\n")
    with gzip.open(d / "c.jsonl.gz", "wt", encoding="utf-8") as fh:
        for i in range(30):
            fh.write(json.dumps({"text": f"Gzip line {i}: numbers one two three four five. " * 8}) + "\n")
    sub = d / "dir"
    sub.mkdir()
    write_text_corpus(sub / "x.txt", n_docs=5, seed=2)
    write_text_corpus(sub / "y.md", n_docs=5, seed=3)
    (sub / "ignored.bin").write_bytes(b"\x00\x01")
    return d


def test_every_data_source_kind_is_tokenized_with_document_separators(
    tmp_path, data_dir, tokenizer_json
) -> None:
    tok = load_tokenizer(tokenizer_json)
    specs = [
        str(data_dir / "a.txt"),
        str(data_dir / "b.jsonl"),
        str(data_dir / "c.jsonl.gz"),
        str(data_dir / "dir"),
        str(data_dir / "dir" / "*.txt"),
    ]
    sources = load_sources(specs, tokenizer_json, tmp_path / "cache", seq_len=64)
    assert len(sources) == 5
    for spec, src in zip(specs, sources, strict=True):
        assert src.train.dtype == np.uint16 and len(src.train) > 64 and len(src.val) > 0, spec
    # .jsonl: 30 documents -> 30 separators over train + val, text decodes back.
    b = sources[1]
    all_ids = np.concatenate([b.train, b.val])
    assert int((all_ids == EOT_ID).sum()) == 30
    assert "birds, trees and the sea" in tok.decode(b.train[:200].tolist())
    assert "Gzip line" in tok.decode(sources[2].train[:50].tolist())
    # directory: both text files, not the .bin
    d_ids = np.concatenate([sources[3].train, sources[3].val])
    assert int((d_ids == EOT_ID).sum()) == 2
    # glob: x.txt only
    g_ids = np.concatenate([sources[4].train, sources[4].val])
    assert int((g_ids == EOT_ID).sum()) == 1
    # Tokenized once: a second load reuses the cache.
    cached = sorted((tmp_path / "cache").iterdir())
    load_sources(specs, tokenizer_json, tmp_path / "cache", seq_len=64)
    assert sorted((tmp_path / "cache").iterdir()) == cached


def test_two_ranks_preparing_the_same_source_do_not_collide(
    tmp_path, tiny_text, tokenizer_json, monkeypatch
) -> None:
    """DDP ranks tokenize the same source at once; the one that renames second must not fail."""
    import shutil

    from gpts_edge.training import data as data_mod

    done = data_mod.prepare_source(str(tiny_text), tokenizer_json, tmp_path / "cache")
    other_rank = shutil.copytree(done, tmp_path / "other-rank")
    shutil.rmtree(done)
    real_replace = os.replace

    def other_rank_finishes_first(src, dst):
        if Path(dst) == done and not done.exists():
            real_replace(other_rank, done)
        return real_replace(src, dst)

    monkeypatch.setattr(data_mod.os, "replace", other_rank_finishes_first)
    again = data_mod.prepare_source(str(tiny_text), tokenizer_json, tmp_path / "cache")
    assert again == done and data_mod.is_prepared(done)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [done.name]  # no temp dir left


def test_mixing_weights_set_the_share_of_each_source(tmp_path, data_dir, tokenizer_json) -> None:
    assert parse_data_spec("data/x.jsonl:3") == ("data/x.jsonl", 3.0)
    assert parse_data_spec("data/x.jsonl") == ("data/x.jsonl", 1.0)
    assert parse_data_spec("data/*.txt:0.5") == ("data/*.txt", 0.5)
    with pytest.raises(GptsError, match="weight must be a positive finite number"):
        parse_data_spec("data/x.jsonl:0")
    specs = [f"{data_dir / 'b.jsonl'}:1", f"{data_dir / 'c.jsonl.gz'}:3"]
    sources = load_sources(specs, tokenizer_json, tmp_path / "cache", seq_len=16)
    assert [s.weight for s in sources] == [1.0, 3.0]
    gz_tokens = set(np.unique(sources[1].train).tolist()) - set(np.unique(sources[0].train).tolist())
    rows = Sampler(sources, 16, seed=0).batch(4000)
    from_gz = np.array([bool(set(r.tolist()) & gz_tokens) for r in rows])
    # Every c.jsonl.gz window of 17 tokens has at least one of its own tokens (each line
    # repeats "Gzip line N: numbers ..."); b.jsonl windows never do.
    assert 0.72 < from_gz.mean() < 0.78


def test_training_on_mixed_sources_runs(tmp_path, data_dir) -> None:
    result = _run(
        tmp_path / "mix",
        [f"{data_dir / 'b.jsonl'}:2", str(data_dir / "dir"), f"{data_dir / 'c.jsonl.gz'}:0.5"],
        max_steps=3,
        eval_every=3,
    )
    assert result["step"] == 3 and np.isfinite(result["val_loss"])
    load_checkpoint(tmp_path / "mix")


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda d: d / "nope.txt", "no such file or directory"),
        (lambda d: d / "nothing-*.txt", "matches no file"),
        (lambda d: (d / "empty").mkdir() or d / "empty", "holds no"),
        (lambda d: (d / "x.parquet").write_bytes(b"PAR1") and d / "x.parquet", "unsupported file type"),
        (lambda d: (d / "bad.jsonl").write_text('{"txt": 1}\n') and d / "bad.jsonl", "string field 'text'"),
        (lambda d: (d / "bad2.jsonl").write_text("not json\n") and d / "bad2.jsonl", "not valid JSON"),
        (lambda d: (d / "short.txt").write_text("too short") and d / "short.txt", "training tokens"),
    ],
    ids=["missing", "empty-glob", "empty-dir", "unsupported", "jsonl-no-text", "jsonl-not-json", "too-short"],
)
def test_bad_data_is_a_clear_error(tmp_path, tokenizer_json, make, needle) -> None:
    spec = make(tmp_path)
    with pytest.raises(GptsError) as err:
        load_sources([str(spec)], tokenizer_json, tmp_path / "cache", seq_len=64)
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert str(spec.name).split("*")[0] in str(err.value)


def test_bad_data_path_through_the_cli_exits_2(tmp_path) -> None:
    from typer.testing import CliRunner

    from gpts_edge.cli import app

    missing = tmp_path / "missing.txt"
    args = [
        "train",
        "--preset",
        "tiny",
        "--data",
        str(missing),
        "--out",
        str(tmp_path / "run"),
        "--max-steps",
        "2",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert result.stderr.strip() == f"error: --data {missing}: no such file or directory"


def test_unknown_preset_and_device_are_clear_errors(tmp_path, tiny_text) -> None:
    with pytest.raises(GptsError, match="unknown preset"):
        preset_config("huge")
    with pytest.raises(GptsError, match="--device"):
        _run(tmp_path / "r", [str(tiny_text)], device="tpu")


# --- DDP ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ddp_two_gloo_processes_train_and_write_a_checkpoint(tmp_path, tiny_text) -> None:
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "gpts_edge.cli",
        "train",
        "--preset",
        "tiny",
        "--device",
        "cpu",
        "--data",
        str(tiny_text),
        "--out",
        str(out),
        "--max-steps",
        "4",
        "--log-every",
        "1",
        "--eval-every",
        "4",
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    load_checkpoint(out)
    snap = sorted((out / "checkpoints").glob("step-*"))[-1]
    state = json.loads((snap / "train_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 4
    assert state["tokens"] == 4 * 2 * 8 * 64  # both processes' batches count
    assert len(state["sampler"]) == 2 and state["sampler"][0] != state["sampler"][1]
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # one writer (rank 0)
    assert "val_loss" in rows[-1]


def test_resume_refuses_changed_settings_unless_named_and_trims_metrics_logged_after_the_snapshot(
    tmp_path,
) -> None:
    import json

    from gpts_edge.errors import GptsError
    from gpts_edge.training.train import preset_config, train

    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"word{i % 97}" for i in range(6000)))
    out = tmp_path / "run"
    common = dict(data=[str(text)], out=str(out), max_steps=8, ckpt_every=4, log_every=1, eval_every=4)
    train(preset_config("tiny", **common, stop_at=4, progress=False))
    metrics = out / "metrics.jsonl"
    # Rows a killed run logged after its last snapshot (step 4) would otherwise appear twice.
    with metrics.open("a") as fh:
        fh.write(json.dumps({"step": 5, "loss": 9.9, "tokens": 1}) + "\n" + '{"step": 6, "lo')
    with pytest.raises(
        GptsError, match=r"changed settings \(lr: saved 0\.003, now 0\.001\).*--override-resume lr"
    ):
        train(preset_config("tiny", **common, lr=1e-3, resume=True, progress=False))
    with pytest.raises(GptsError, match=r"seed: saved 1337, now 7"):
        train(preset_config("tiny", **common, seed=7, resume=True, progress=False))
    result = train(
        preset_config("tiny", **common, lr=1e-3, resume=True, override_resume="lr", progress=False)
    )
    assert result["step"] == 8
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # no step twice, no cut line
    assert 9.9 not in [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]
