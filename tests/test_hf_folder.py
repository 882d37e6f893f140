"""``gpts-edge export --format hf`` / ``import --format hf`` as files: layout, exact round trip,
bf16/fp16 weights, atomic writes and one-line errors for bad folders. No transformers needed
(tests/test_hf_transformers.py runs the folder under transformers)."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from gpts_edge.checkpoint import load_checkpoint
from gpts_edge.errors import GptsError
from gpts_edge.export import hf
from gpts_edge.export.hf import export_hf, import_hf
from tests.conftest import run_cli

CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json")


@pytest.fixture(scope="session")
def hf_folder(tiny_checkpoint, tmp_path_factory) -> Path:
    return export_hf(tiny_checkpoint, tmp_path_factory.mktemp("hf_folder") / "gpts-tiny", log=lambda m: None)


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "src"))


def _write_raw_safetensors(path: Path, tensors: dict[str, tuple[str, tuple[int, ...], bytes]]) -> None:
    """A safetensors file from raw bytes (numpy cannot write bfloat16)."""
    header, offset, blobs = {}, 0, []
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def test_hf_export_writes_transformers_layout(hf_folder, tiny_checkpoint):
    names = {p.name for p in hf_folder.iterdir()}
    assert names == {
        "config.json",
        "configuration_gpts.py",
        "modeling_gpts.py",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "README.md",
    }
    config = json.loads((hf_folder / "config.json").read_text())
    assert config["model_type"] == "gpts"
    assert config["architectures"] == ["GPTSForCausalLM"]
    assert config["auto_map"] == {
        "AutoConfig": "configuration_gpts.GPTSConfig",
        "AutoModelForCausalLM": "modeling_gpts.GPTSForCausalLM",
    }
    assert config["tie_word_embeddings"] is True
    tok_config = json.loads((hf_folder / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tok_config["bos_token"] == tok_config["eos_token"] == tok_config["pad_token"] == "<|endoftext|>"
    gen = json.loads((hf_folder / "generation_config.json").read_text())
    # transformers would apply top_k=50 if the field were missing; ours is off.
    assert gen["top_k"] == 0 and gen["pad_token_id"] == gen["eos_token_id"] == 0
    for name in hf.REMOTE_FILES:
        assert (hf_folder / name).read_bytes() == (hf.REMOTE_DIR / name).read_bytes()
    weights = load_file(str(hf_folder / "model.safetensors"))
    assert "lm_head.weight" not in weights  # tied: transformers re-ties it on load
    assert all(w.dtype == np.float32 for w in weights.values())
    assert (hf_folder / "model.safetensors").read_bytes() == (
        tiny_checkpoint / "model.safetensors"
    ).read_bytes()


def test_hf_export_folder_is_also_a_gpts_checkpoint(hf_folder, tiny_checkpoint):
    got, want = load_checkpoint(hf_folder), load_checkpoint(tiny_checkpoint)
    assert got.config == want.config
    for name, w in want.weights.items():
        np.testing.assert_array_equal(got.weights[name], w)


def test_hf_round_trip_export_import_is_exact(hf_folder, tiny_checkpoint, tmp_path):
    out = import_hf(hf_folder, tmp_path / "back")
    for name in CHECKPOINT_FILES:
        assert (out / name).read_bytes() == (tiny_checkpoint / name).read_bytes(), name


def test_hf_import_of_bf16_and_fp16_weights_gives_widened_fp32(hf_folder, tmp_path):
    src = _copy(hf_folder, tmp_path)
    weights = load_file(str(src / "model.safetensors"))
    names = sorted(weights)
    half = {n: weights[n].astype(np.float16) for n in names[::2]}
    bf16 = {n: (weights[n].view(np.uint32) >> 16).astype(np.uint16) for n in names[1::2]}
    raw = {n: ("F16", a.shape, a.tobytes()) for n, a in half.items()}
    raw |= {n: ("BF16", a.shape, a.tobytes()) for n, a in bf16.items()}
    # A save_pretrained of a tied model may also store the head: it must equal the embedding.
    embed = "model.embed_tokens.weight"
    raw["lm_head.weight"] = raw[embed]
    _write_raw_safetensors(src / "model.safetensors", raw)

    got = load_checkpoint(import_hf(src, tmp_path / "ckpt")).weights
    assert set(got) == set(weights)
    for n, a in half.items():
        np.testing.assert_array_equal(got[n], a.astype(np.float32))
    for n, a in bf16.items():
        np.testing.assert_array_equal(got[n], (a.astype(np.uint32) << 16).view(np.float32))


def test_hf_import_reads_sharded_folder(hf_folder, tmp_path):
    src = _copy(hf_folder, tmp_path)
    weights = load_file(str(src / "model.safetensors"))
    (src / "model.safetensors").unlink()
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[:5], "model-00002-of-00002.safetensors": names[5:]}
    for shard, keys in shards.items():
        save_file({k: weights[k] for k in keys}, str(src / shard))
    index = {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    got = load_checkpoint(import_hf(src, tmp_path / "ckpt")).weights
    for k, w in weights.items():
        np.testing.assert_array_equal(got[k], w)


def _set_config(field, value):
    def change(src: Path) -> None:
        data = json.loads((src / "config.json").read_text())
        data[field] = value
        (src / "config.json").write_text(json.dumps(data))

    return change


def _edit_weights(edit):
    def change(src: Path) -> None:
        weights = load_file(str(src / "model.safetensors"))
        edit(weights)
        save_file(weights, str(src / "model.safetensors"))

    return change


def _truncate(src: Path) -> None:
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])


def _only_pickle(src: Path) -> None:
    (src / "model.safetensors").rename(src / "pytorch_model.bin")


def _int_tensor(w: dict) -> None:
    w["model.norm.weight"] = w["model.norm.weight"].astype(np.int32)


def _nan(w: dict) -> None:
    w["model.norm.weight"][0] = np.nan


def _transpose(w: dict) -> None:
    w["model.layers.0.mlp.up_proj.weight"] = np.ascontiguousarray(w["model.layers.0.mlp.up_proj.weight"].T)


def _untied_head(w: dict) -> None:
    w["lm_head.weight"] = w["model.embed_tokens.weight"] + 1


BAD_FOLDERS = {
    "missing config.json": (lambda s: (s / "config.json").unlink(), "config.json: file not found"),
    "config not JSON": (lambda s: (s / "config.json").write_text("{oops"), "not valid JSON"),
    "other model_type": (_set_config("model_type", "llama"), "model_type: expected 'gpts', found 'llama'"),
    "unknown config field": (_set_config("sliding_window", 128), "unknown field(s) ['sliding_window']"),
    "yarn rope": (_set_config("rope_parameters", {"rope_type": "yarn", "factor": 4.0}), "only default RoPE"),
    "contradicting rope_theta": (
        _set_config("rope_parameters", {"rope_type": "default", "rope_theta": 10000.0}),
        "contradicts rope_theta 2500.0",
    ),
    "no weights": (lambda s: (s / "model.safetensors").unlink(), "model.safetensors: file not found"),
    "pickle only": (_only_pickle, "only pickle weights"),
    "truncated weights": (_truncate, "model.safetensors: "),
    "missing tensor": (
        _edit_weights(lambda w: w.pop("model.norm.weight")),
        "missing tensor 'model.norm.weight'",
    ),
    "extra tensor": (
        _edit_weights(lambda w: w.update(extra=np.zeros(2, np.float32))),
        "unexpected tensor 'extra'",
    ),
    "wrong shape": (_edit_weights(_transpose), "expected shape [48, 32], found [32, 48]"),
    "int tensor": (_edit_weights(_int_tensor), "expected dtype F32, F16 or BF16, found I32"),
    "NaN": (_edit_weights(_nan), "contains NaN"),
    "untied head": (_edit_weights(_untied_head), "tied head"),
    "no tokenizer": (lambda s: (s / "tokenizer.json").unlink(), "tokenizer.json: file not found"),
    "broken tokenizer": (lambda s: (s / "tokenizer.json").write_text("{}"), "not a valid tokenizer.json"),
    "other eos": (
        lambda s: (s / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"})),
        "eos_token: expected '<|endoftext|>'",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FOLDERS))
def test_hf_import_rejects_bad_folder_with_one_line_error(hf_folder, tmp_path, case):
    corrupt, message = BAD_FOLDERS[case]
    src = _copy(hf_folder, tmp_path)
    corrupt(src)
    with pytest.raises(GptsError) as info:
        import_hf(src, tmp_path / "out")
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]  # no temp folder left behind


def test_hf_import_rejects_a_file(hf_folder, tmp_path):
    with pytest.raises(GptsError, match="expected a Hugging Face model folder"):
        import_hf(hf_folder / "config.json", tmp_path / "out")


def test_hf_export_failure_leaves_nothing_behind(tiny_checkpoint, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hf, "_model_card", fail)
    with pytest.raises(OSError, match="disk full"):
        export_hf(tiny_checkpoint, tmp_path / "out", log=lambda m: None)
    assert list(tmp_path.iterdir()) == []


def test_hf_export_replaces_existing_folder_and_rejects_missing_parent(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    export_hf(tiny_checkpoint, out, log=lambda m: None)
    assert not (out / "stale.txt").exists() and (out / "modeling_gpts.py").is_file()
    with pytest.raises(GptsError, match="output directory does not exist"):
        export_hf(tiny_checkpoint, tmp_path / "no" / "such" / "dir", log=lambda m: None)


def test_hf_cli_export_import_and_error_exit_code(tiny_checkpoint, tmp_path):
    exported = run_cli("export", "--format", "hf", "--model", tiny_checkpoint, "-o", tmp_path / "hf")
    assert exported.returncode == 0, exported.stderr
    assert (tmp_path / "hf" / "modeling_gpts.py").is_file()
    imported = run_cli("import", "--format", "hf", tmp_path / "hf", "-o", tmp_path / "ckpt")
    assert imported.returncode == 0, imported.stderr
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == (
        tiny_checkpoint / "model.safetensors"
    ).read_bytes()
    bad = run_cli("import", "--format", "hf", tmp_path / "nowhere", "-o", tmp_path / "x")
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: ") and "expected a Hugging Face model folder" in bad.stderr


def test_hf_import_accepts_rope_theta_inside_rope_parameters(hf_folder, tiny_checkpoint, tmp_path):
    """Newer transformers versions may save rope_theta inside rope_parameters only."""
    src = _copy(hf_folder, tmp_path)
    data = json.loads((src / "config.json").read_text())
    theta = data.pop("rope_theta")
    data["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    (src / "config.json").write_text(json.dumps(data))
    out = import_hf(src, tmp_path / "ckpt")
    assert (out / "config.json").read_bytes() == (tiny_checkpoint / "config.json").read_bytes()
