"""Checkpoint directories: round trip, one clear error line per bad input (through the CLI),
atomic writes."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

from gpts_edge.checkpoint import (
    GENERATION_FILE,
    WEIGHTS_FILE,
    load_checkpoint,
    save_checkpoint,
    weights_sha256,
)
from gpts_edge.cli import app
from gpts_edge.config import PRESETS
from gpts_edge.errors import GptsError
from tests.conftest import run_cli


def test_save_load_round_trip_is_exact(tmp_path, tiny_checkpoint, tokenizer_json) -> None:
    ckpt = load_checkpoint(tiny_checkpoint)
    assert ckpt.path == tiny_checkpoint.resolve()
    assert ckpt.config == PRESETS["tiny"]
    out = save_checkpoint(tmp_path / "copy", ckpt.config, ckpt.weights, tokenizer_json, ckpt.generation)
    again = load_checkpoint(out)
    assert again.config == ckpt.config
    assert again.generation == ckpt.generation
    assert sorted(again.weights) == sorted(ckpt.weights)
    for name, w in ckpt.weights.items():
        assert again.weights[name].dtype == np.float32
        assert np.array_equal(again.weights[name], w), name
    # Deterministic bytes: same weights, same file, same hash.
    assert weights_sha256(out) == weights_sha256(tiny_checkpoint)


def test_checkpoint_layout_is_hf_llama(tiny_checkpoint) -> None:
    names = set(load_file(str(tiny_checkpoint / WEIGHTS_FILE)))
    assert "model.embed_tokens.weight" in names and "model.norm.weight" in names
    assert (
        "model.layers.1.self_attn.q_proj.weight" in names and "model.layers.0.mlp.down_proj.weight" in names
    )
    assert not any(n.startswith("lm_head") for n in names)  # tied head is not stored
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["model_type"] == "gpts" and config["tie_word_embeddings"] is True
    gen = json.loads((tiny_checkpoint / GENERATION_FILE).read_text())
    assert (
        gen["temperature"],
        gen["top_p"],
        gen["repetition_penalty"],
        gen["no_repeat_ngram_size"],
        gen["max_new_tokens"],
    ) == (0.8, 0.95, 1.1, 4, 80)


def test_bundled_generation_config_has_the_card_defaults() -> None:
    gen = load_checkpoint(None).generation
    assert (
        gen["temperature"],
        gen["top_p"],
        gen["repetition_penalty"],
        gen["no_repeat_ngram_size"],
        gen["max_new_tokens"],
    ) == (0.8, 0.95, 1.1, 4, 80)


# --- bad inputs -------------------------------------------------------------------------------
def _weights(path: Path) -> dict[str, np.ndarray]:
    return load_file(str(path / WEIGHTS_FILE))


def _small_tokenizer(path: Path) -> None:
    from gpts_edge.tokenizer import save_tokenizer, train_tokenizer

    text = ["Tokenizers with a different vocabulary must be refused by the loader. " * 20]
    save_tokenizer(train_tokenizer(text, vocab_size=300), path)


def _break(kind: str, d: Path) -> str:
    """Damage checkpoint ``d`` one way; return the file the error must name."""
    w = d / WEIGHTS_FILE
    if kind == "missing-config":
        (d / "config.json").unlink()
        return "config.json"
    if kind == "missing-weights":
        w.unlink()
        return WEIGHTS_FILE
    if kind == "missing-tokenizer":
        (d / "tokenizer.json").unlink()
        return "tokenizer.json"
    if kind == "truncated-safetensors":
        data = w.read_bytes()
        w.write_bytes(data[: len(data) // 2])
        return WEIGHTS_FILE
    if kind == "corrupt-header":
        data = bytearray(w.read_bytes())
        (n,) = struct.unpack("<Q", data[:8])
        data[8 : 8 + n] = b"{" + b"\x00" * (n - 1)  # same length, not JSON
        w.write_bytes(bytes(data))
        return WEIGHTS_FILE
    if kind == "absurd-header-length":
        data = bytearray(w.read_bytes())
        data[:8] = struct.pack("<Q", 1 << 40)
        w.write_bytes(bytes(data))
        return WEIGHTS_FILE
    if kind == "not-safetensors":
        w.write_bytes(b"\x80\x02}q\x00.")  # a pickle: must never be unpickled
        return WEIGHTS_FILE
    weights = _weights(d)
    if kind == "missing-tensor":
        del weights["model.layers.1.mlp.up_proj.weight"]
    elif kind == "extra-tensor":
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"].copy()
    elif kind == "misshaped-tensor":
        weights["model.layers.0.self_attn.k_proj.weight"] = np.zeros((8, 32), np.float32)
    elif kind == "float16-tensor":
        weights["model.norm.weight"] = weights["model.norm.weight"].astype(np.float16)
    elif kind == "tokenizer-vocab":
        _small_tokenizer(d / "tokenizer.json")
        return "tokenizer.json"
    elif kind == "config-vocab":
        cfg = json.loads((d / "config.json").read_text())
        cfg["vocab_size"] = 300
        (d / "config.json").write_text(json.dumps(cfg))
        return WEIGHTS_FILE  # the weights (4096 rows) disagree with the config first
    else:
        raise AssertionError(kind)
    save_file(weights, str(w))
    return WEIGHTS_FILE


BAD = {
    "missing-config": "file not found",
    "missing-weights": "file not found",
    "missing-tokenizer": "file not found",
    "truncated-safetensors": "safetensors",
    "corrupt-header": "safetensors",
    "absurd-header-length": "safetensors",
    "not-safetensors": "safetensors",
    "missing-tensor": "missing tensor 'model.layers.1.mlp.up_proj.weight'",
    "extra-tensor": "unexpected tensor 'lm_head.weight'",
    "misshaped-tensor": "expected shape [16, 32], found [8, 32]",
    "float16-tensor": "expected dtype float32, found float16",
    "tokenizer-vocab": "expected 4096 (from config.json), found 300",
    "config-vocab": "expected shape [300, 32], found [4096, 32]",
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_checkpoint_is_one_error_line_exit_2(tmp_path, tiny_checkpoint, kind: str) -> None:
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, d)
    culprit = _break(kind, d)
    with pytest.raises(GptsError) as err:
        load_checkpoint(d)
    assert BAD[kind] in str(err.value)
    assert str(d / culprit) in str(err.value) or str(d.resolve() / culprit) in str(err.value)

    result = CliRunner().invoke(app, ["info", str(d)])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and culprit in lines[0] and BAD[kind] in lines[0]
    assert result.stdout == ""


@pytest.mark.parametrize("kind", ["truncated-safetensors", "tokenizer-vocab"])
def test_bad_checkpoint_in_a_real_process_has_no_traceback(tmp_path, tiny_checkpoint, kind: str) -> None:
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, d)
    culprit = _break(kind, d)
    proc = run_cli("info", d)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and culprit in proc.stderr


def test_info_on_a_missing_directory_and_a_file(tmp_path, tiny_checkpoint) -> None:
    for target, needle in (
        (tmp_path / "nope", "no such checkpoint directory"),
        (tiny_checkpoint / "config.json", "expected a checkpoint directory"),
    ):
        result = CliRunner().invoke(app, ["info", str(target)])
        assert result.exit_code == 2 and needle in result.stderr


# --- atomic writes ----------------------------------------------------------------------------
def _leftovers(parent: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name not in keep)


def test_failed_save_leaves_no_partial_directory(
    tmp_path, tiny_checkpoint, tokenizer_json, monkeypatch
) -> None:
    ckpt = load_checkpoint(tiny_checkpoint)
    import safetensors.numpy

    def crash_mid_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 100)  # a partial file, then the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.numpy, "save_file", crash_mid_write)
    parent = tmp_path / "out"
    parent.mkdir()
    with pytest.raises(OSError):
        save_checkpoint(parent / "model", ckpt.config, ckpt.weights, tokenizer_json)
    assert _leftovers(parent, set()) == []  # neither the target nor a temp dir

    # A failing overwrite keeps the previous checkpoint whole.
    monkeypatch.undo()
    save_checkpoint(parent / "model", ckpt.config, ckpt.weights, tokenizer_json)
    before = weights_sha256(parent / "model")
    monkeypatch.setattr(safetensors.numpy, "save_file", crash_mid_write)
    changed = {k: v + 1 for k, v in ckpt.weights.items()}
    with pytest.raises(OSError):
        save_checkpoint(parent / "model", ckpt.config, changed, tokenizer_json)
    assert _leftovers(parent, {"model"}) == []
    assert weights_sha256(parent / "model") == before
    load_checkpoint(parent / "model")


def test_invalid_weights_are_refused_before_anything_is_written(
    tmp_path, tiny_checkpoint, tokenizer_json
) -> None:
    ckpt = load_checkpoint(tiny_checkpoint)
    weights = dict(ckpt.weights)
    del weights["model.norm.weight"]
    with pytest.raises(GptsError, match="missing tensor 'model.norm.weight'"):
        save_checkpoint(tmp_path / "model", ckpt.config, weights, tokenizer_json)
    assert list(tmp_path.iterdir()) == []


def test_save_with_missing_tokenizer_is_a_clear_error(tmp_path, tiny_checkpoint) -> None:
    ckpt = load_checkpoint(tiny_checkpoint)
    with pytest.raises(GptsError, match="tokenizer"):
        save_checkpoint(tmp_path / "model", ckpt.config, ckpt.weights, tmp_path / "nope.json")
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_the_checkpoint(tmp_path, tiny_checkpoint, tokenizer_json) -> None:
    ckpt = load_checkpoint(tiny_checkpoint)
    save_checkpoint(tmp_path / "model", ckpt.config, ckpt.weights, tokenizer_json)
    changed = {k: v * 2 for k, v in ckpt.weights.items()}
    save_checkpoint(tmp_path / "model", ckpt.config, changed, tokenizer_json)
    assert _leftovers(tmp_path, {"model"}) == []
    loaded = load_checkpoint(tmp_path / "model").weights
    assert np.array_equal(loaded["model.norm.weight"], changed["model.norm.weight"])


def test_every_writer_names_a_missing_or_unwritable_output_folder(tmp_path, tokenizer_json) -> None:
    import os

    from gpts_edge.export.gguf import export_gguf
    from gpts_edge.fileio import require_output_dir

    with pytest.raises(GptsError, match=r"/nope: output directory does not exist"):
        require_output_dir(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(GptsError, match=r"/file: output location is not a directory"):
        require_output_dir(tmp_path / "file")
    if os.geteuid() != 0:  # root writes anywhere; /proc refuses everyone
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(GptsError, match="output directory is not writable"):
            require_output_dir(locked)
    # As root os.access says yes to /proc; the write itself then fails, as one line.
    with pytest.raises(
        GptsError, match=r"^/proc: (output directory is not writable|cannot write the export)"
    ):
        export_gguf(None, "/proc/model.gguf", log=lambda _m: None)
