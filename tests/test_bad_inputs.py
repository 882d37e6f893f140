"""Every bad input of issue #14 through the real CLI: exit code 2, exactly one `error:` line on
stderr, no traceback. The cases that need no model load come first (fast); the rest use the
tiny seeded checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpts_edge.checkpoint import load_checkpoint, save_checkpoint
from tests.conftest import REPO, run_cli


def run_raw(*args: str | bytes, cwd: Path | None = None, stdin: bytes | None = None):
    """Like run_cli, but argv may hold bytes that are not UTF-8 (as a shell passes them)."""
    return subprocess.run(
        [sys.executable, "-m", "gpts_edge.cli", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        input=stdin,
        capture_output=True,
        timeout=120,
    )


def assert_one_error(result, needle: str) -> None:
    err = result.stderr if isinstance(result.stderr, str) else result.stderr.decode("utf-8", "replace")
    assert result.returncode == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, err
    assert needle in errors[0], errors[0]


@pytest.fixture(scope="module")
def place(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("bad")
    (p / "corpus.txt").write_text("some words to train on\n" * 20)
    (p / "notes.txt").write_text("my notes")
    (p / "package.json").write_text('{"name": "app"}')
    (p / "sub").mkdir()
    (p / "fake.gguf").write_bytes(b"GGUF" + bytes(40))
    (p / "mine").mkdir()
    (p / "mine" / "thesis.tex").write_text("do not delete")
    return p


# (argv, cwd below `place` or None, stdin, the text the error line must contain)
FAST_CASES = {
    "seed_negative": (["generate", "--seed", "-1", "x"], None, None, "--seed"),
    "prompt_not_utf8": (["generate", b"a\xffb"], None, None, "not valid UTF-8"),
    "stdin_prompt_not_utf8": (["generate", "-"], None, b"a\xffb", "not valid UTF-8"),
    "vocab_size_negative": (
        ["tokenizer", "train", "--data", "corpus.txt", "-o", "tok.json", "--vocab-size", "-5"],
        ".",
        None,
        "--vocab-size",
    ),
    "tokenizer_over_a_foreign_file": (
        ["tokenizer", "train", "--data", "corpus.txt", "-o", "notes.txt"],
        ".",
        None,
        "expected a file name ending in .json",
    ),
    "web_port_out_of_range": (["web", "--port", "70000"], None, None, "--port"),
    "import_into_current_folder": (
        ["import", "--format", "gguf", "fake.gguf", "-o", "."],
        ".",
        None,
        "current folder",
    ),
    "export_hf_into_parent_folder": (
        ["export", "--format", "hf", "-o", ".."],
        "sub",
        None,
        "holds the current folder",
    ),
    "export_gguf_without_suffix": (
        ["export", "--format", "gguf", "-o", "notes.txt"],
        ".",
        None,
        "ending in .gguf",
    ),
    "export_hf_into_a_folder_of_other_files": (
        ["export", "--format", "hf", "-o", "mine"],
        ".",
        None,
        "not a previous Hugging Face export",
    ),
    "export_onnx_without_suffix": (
        ["export", "--format", "onnx", "-o", "notes.txt"],
        ".",
        None,
        "expected a .onnx file path or a folder",
    ),
    "export_onnx_into_a_folder_of_other_files": (
        ["export", "--format", "onnx", "-o", "mine"],
        ".",
        None,
        "not a previous ONNX export",
    ),
    "export_ort_into_a_folder_of_other_files": (
        ["export", "--format", "ort", "-o", "mine"],
        ".",
        None,
        "not a previous ORT export",
    ),
    "tokenizer_over_a_json_that_is_not_one": (
        ["tokenizer", "train", "--data", "corpus.txt", "-o", "package.json"],
        ".",
        None,
        "exists and is not a tokenizers tokenizer.json",
    ),
    "import_into_a_folder_of_other_files": (
        ["import", "--format", "gguf", "fake.gguf", "-o", "mine"],
        ".",
        None,
        "not a previous checkpoint",
    ),
}
# train's flags, each checked before any data is read or any folder written.
TRAIN = ["train", "--preset", "tiny", "--data", "corpus.txt", "-o", "run"]
FAST_CASES |= {
    "train_lr_negative": ([*TRAIN, "--lr", "-1"], ".", None, "--lr"),
    "train_lr_nan": ([*TRAIN, "--lr", "nan"], ".", None, "--lr"),
    "train_ckpt_every_zero": ([*TRAIN, "--ckpt-every", "0"], ".", None, "--ckpt-every"),
    "train_log_every_zero": ([*TRAIN, "--log-every", "0"], ".", None, "--log-every"),
    "train_max_steps_negative": ([*TRAIN, "--max-steps", "-5"], ".", None, "--max-steps"),
    "train_batch_size_zero": ([*TRAIN, "--batch-size", "0"], ".", None, "--batch-size"),
    "train_grad_accum_zero": ([*TRAIN, "--grad-accum", "0"], ".", None, "--grad-accum"),
    "train_data_weight_inf": (
        ["train", "--preset", "tiny", "--data", "corpus.txt:inf", "-o", "run"],
        ".",
        None,
        "positive finite number",
    ),
    "train_output_is_a_file": (
        ["train", "--preset", "tiny", "--data", "corpus.txt", "-o", "notes.txt"],
        ".",
        None,
        "exists and is not a folder",
    ),
    "train_tokenizer_missing": ([*TRAIN, "--tokenizer", "nope.json"], ".", None, "--tokenizer nope.json"),
}


@pytest.mark.parametrize("case", list(FAST_CASES))
def test_bad_input_is_one_error_line_and_exit_2(case: str, place: Path) -> None:
    argv, cwd, stdin, needle = FAST_CASES[case]
    before = sorted(p.name for p in (place / "mine").iterdir())
    result = run_raw(*argv, cwd=None if cwd is None else place / cwd, stdin=stdin)
    assert_one_error(result, needle)
    assert sorted(p.name for p in (place / "mine").iterdir()) == before  # nothing deleted
    assert (place / "notes.txt").read_text() == "my notes"
    assert (place / "package.json").read_text() == '{"name": "app"}'


def test_version_prints_the_package_version() -> None:
    from gpts_edge import __version__

    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"gpts-edge {__version__}"


# --- cases on a (tiny) model -----------------------------------------------------------------


@pytest.fixture(scope="module")
def broken(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Checkpoints and files that are wrong in one way each."""
    root = tmp_path_factory.mktemp("broken")
    huge = root / "huge-context"
    shutil.copytree(tiny_checkpoint, huge)
    cfg = json.loads((huge / "config.json").read_text())
    cfg["max_position_embeddings"] = 1_000_000_000
    (huge / "config.json").write_text(json.dumps(cfg))

    ckpt = load_checkpoint(tiny_checkpoint)
    weights = dict(ckpt.weights)
    w = weights["model.layers.1.mlp.down_proj.weight"].copy()
    w[3, 4] = np.nan
    weights["model.layers.1.mlp.down_proj.weight"] = w
    nan_ckpt = save_checkpoint(root / "nan", ckpt.config, weights, ckpt.tokenizer_path, ckpt.generation)

    from gpts_edge.checkpoint import Checkpoint
    from gpts_edge.export.gguf import plan_gguf, write_plan

    nan_gguf = write_plan(
        plan_gguf(Checkpoint(ckpt.path, ckpt.config, weights, ckpt.generation)), root / "nan.gguf"
    )
    return {"huge": huge, "nan": nan_ckpt, "nan_gguf": nan_gguf}


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["info", "{huge}"], "max_position_embeddings: expected at most"),
        (["generate", "hi", "--model", "{huge}"], "max_position_embeddings"),
        (["info", "{nan}"], "'model.layers.1.mlp.down_proj.weight' contains NaN"),
        (["generate", "hi", "--model", "{nan_gguf}"], "'blk.1.ffn_down.weight' contains NaN"),
        (["import", "--format", "gguf", "{nan_gguf}", "-o", "{out}"], "contains NaN"),
    ],
    ids=["info_huge_context", "generate_huge_context", "info_nan", "generate_nan_gguf", "import_nan_gguf"],
)
def test_bad_model_is_one_error_line_and_exit_2(argv, needle, broken, tmp_path: Path) -> None:
    args = [a.format(out=tmp_path / "out", **broken) for a in argv]
    result = run_raw(*args)
    assert_one_error(result, needle)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
@pytest.mark.parametrize("name", ["config.json", "generation_config.json", "model.safetensors", "."])
def test_unreadable_file_is_named_not_reported_missing(
    name: str, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    target = ckpt / name
    target.chmod(0)
    try:
        result = run_raw("info", str(ckpt))
    finally:
        target.chmod(0o755 if target.is_dir() else 0o644)
    assert_one_error(result, "Permission denied")
    assert "not found" not in result.stderr.decode()


def test_generate_dash_reads_the_prompt_from_stdin(tiny_checkpoint: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    base = [sys.executable, "-m", "gpts_edge.cli", "generate", "--model", str(tiny_checkpoint)]
    opts = ["--greedy", "--max-new-tokens", "5"]
    piped = subprocess.run([*base, "-", *opts], input="Once upon", env=env, capture_output=True, text=True)
    direct = subprocess.run([*base, "Once upon", *opts], env=env, capture_output=True, text=True)
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == direct.stdout and piped.stdout.startswith("Once upon")
