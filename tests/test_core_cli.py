"""`gpts-edge info` and `gpts-edge generate` as a user runs them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gpts_edge.checkpoint import default_model_dir, weights_sha256
from gpts_edge.cli import app
from gpts_edge.config import PRESETS


def _invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_info_json_has_absolute_checkpoint_and_parameters(tiny_checkpoint, monkeypatch) -> None:
    monkeypatch.chdir(tiny_checkpoint.parent)
    result = _invoke("info", tiny_checkpoint.name, "--json")  # a relative path in, absolute out
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert Path(d["checkpoint"]).is_absolute() and Path(d["checkpoint"]) == tiny_checkpoint.resolve()
    assert d["parameters"] == PRESETS["tiny"].num_parameters
    assert d["vocab_size"] == 4096
    assert d["weights_sha256"] == weights_sha256(tiny_checkpoint)
    assert d["config"]["model_type"] == "gpts"
    assert set(d["files"]) >= {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"}


def test_info_defaults_to_the_bundled_model() -> None:
    result = _invoke("info", "--json")
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert Path(d["checkpoint"]) == default_model_dir().resolve()
    assert d["parameters"] == 1_426_176
    text = _invoke("info")
    assert text.exit_code == 0 and "1,426,176" in text.stdout and "sha256" in text.stdout


def test_installed_console_script_runs() -> None:
    exe = shutil.which("gpts-edge") or str(Path(sys.executable).parent / "gpts-edge")
    if not os.path.exists(exe):
        pytest.skip("the gpts-edge console script is not installed in this environment")
    proc = subprocess.run([exe, "info", "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["parameters"] == 1_426_176


# --- generate -----------------------------------------------------------------------------------
def _generate(ckpt: Path, *args: str):
    # The PyTorch reference runtime explicitly: the CLI's default runtime may be another one.
    if "--runtime" not in args:
        args = (*args, "--runtime", "torch")
    return _invoke("generate", *args, "--model", ckpt, "--max-new-tokens", "12")


def test_generate_with_a_seed_is_reproducible(tiny_checkpoint) -> None:
    a = _generate(tiny_checkpoint, "Once upon a time", "--seed", "3")
    b = _generate(tiny_checkpoint, "Once upon a time", "--seed", "3")
    c = _generate(tiny_checkpoint, "Once upon a time", "--seed", "4")
    assert a.exit_code == b.exit_code == c.exit_code == 0, a.output
    assert a.stdout == b.stdout
    assert a.stdout.startswith("Once upon a time") and len(a.stdout) > len("Once upon a time\n")
    assert c.stdout != a.stdout


def test_generate_greedy_matches_the_library_and_ignores_the_seed(tiny_checkpoint) -> None:
    from gpts_edge.generation import generate_text, sampling_options
    from gpts_edge.torch_runtime import TorchRuntime

    a = _generate(tiny_checkpoint, "Hello", "--greedy", "--seed", "1")
    b = _generate(tiny_checkpoint, "Hello", "--greedy", "--seed", "2")
    assert a.exit_code == 0 and a.stdout == b.stdout
    rt = TorchRuntime(tiny_checkpoint)
    want = "".join(
        generate_text(rt, "Hello", sampling_options(rt.generation_config, greedy=True, max_new_tokens=12))
    )
    assert a.stdout == "Hello" + want + "\n"


def test_generate_stream_prints_the_same_text(tiny_checkpoint) -> None:
    a = _generate(tiny_checkpoint, "Hi", "--seed", "5")
    b = _generate(tiny_checkpoint, "Hi", "--seed", "5", "--stream")
    assert b.exit_code == 0 and a.stdout == b.stdout


def test_generate_with_empty_prompt_works(tiny_checkpoint) -> None:
    result = _generate(tiny_checkpoint, "", "--seed", "0", "--temperature", "1.0")
    assert result.exit_code == 0, result.output


def test_generate_long_prompt_notes_on_stderr(tiny_checkpoint) -> None:
    result = _generate(tiny_checkpoint, "word " * 200, "--greedy")
    assert result.exit_code == 0
    assert "note: prompt has" in result.stderr and "keeping the last 64" in result.stderr
    assert "note" not in result.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--temperature", "-1"], "--temperature: expected >= 0, found -1.0"),
        (["--top-p", "0"], "--top-p: expected a value in (0, 1], found 0.0"),
        (["--top-p", "1.5"], "--top-p: expected a value in (0, 1], found 1.5"),
        (["--runtime", "tflite"], "--runtime: unknown runtime 'tflite'"),
        (["--top-k", "-3"], "--top-k"),
    ],
)
def test_generate_bad_options_exit_2_with_one_line(tiny_checkpoint, args: list[str], needle: str) -> None:
    result = _generate(tiny_checkpoint, "Hi", *args)
    assert result.exit_code == 2
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert result.stderr.strip() == f"error: {needle}" or (
        result.stderr.startswith(f"error: {needle}") and result.stderr.count("\n") == 1
    )


def test_generate_missing_model_is_a_clear_error(tmp_path) -> None:
    result = _invoke("generate", "Hi", "--runtime", "torch", "--model", tmp_path / "nope")
    assert result.exit_code == 2 and "nope: no such file or folder" in result.stderr


@pytest.mark.parametrize("value", ["hot", None, True, [0.8]])
def test_bad_generation_config_value_is_a_clear_error(tmp_path, tiny_checkpoint, value) -> None:
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, d)
    gen = json.loads((d / "generation_config.json").read_text())
    gen["temperature"] = value
    (d / "generation_config.json").write_text(json.dumps(gen))
    result = _generate(d, "Hi")
    assert result.exit_code == 2
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert result.stderr.startswith("error: generation_config.json: field temperature: expected a number")
