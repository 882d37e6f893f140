"""ModelConfig: the model card's values, config.json round trip, clear errors on bad fields."""

from __future__ import annotations

import json

import pytest

from gpts_edge.config import PRESETS, ModelConfig
from gpts_edge.errors import GptsError


def test_defaults_equal_the_model_card() -> None:
    c = ModelConfig()
    assert (c.vocab_size, c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (
        4096,
        128,
        5,
        4,
        2,
        32,
    )
    assert c.intermediate_size == 341
    assert c.context_length == 384
    assert c.rope_theta == 2500.0
    assert c.rms_norm_eps == 1e-6
    assert c.exclusive_attention is True
    assert c.group_size == 2
    hf = c.to_hf_dict()
    assert hf["tie_word_embeddings"] is True and hf["attention_bias"] is False
    assert hf["model_type"] == "gpts" and hf["architectures"] == ["GPTSForCausalLM"]
    assert PRESETS["gpt-s-1.4m"] == c


def test_config_is_frozen() -> None:
    with pytest.raises(AttributeError):
        ModelConfig().hidden_size = 64  # type: ignore[misc]


def test_config_json_uses_hf_field_names() -> None:
    hf = ModelConfig().to_hf_dict()
    for key in (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "intermediate_size",
        "max_position_embeddings",
        "rope_theta",
        "rms_norm_eps",
        "tie_word_embeddings",
        "attention_bias",
        "model_type",
        "architectures",
    ):
        assert key in hf, key
    assert hf["num_hidden_layers"] == 5 and hf["max_position_embeddings"] == 384


@pytest.mark.parametrize(
    "cfg",
    [ModelConfig(), PRESETS["tiny"], ModelConfig(exclusive_attention=False)],
    ids=["card", "tiny", "plain-gqa"],
)
def test_config_json_round_trips(tmp_path, cfg: ModelConfig) -> None:
    path = tmp_path / "config.json"
    cfg.save(path)
    assert ModelConfig.load(path) == cfg
    # Also through a plain JSON text edit-free reload (what HF tooling would write back).
    assert ModelConfig.from_hf_dict(json.loads(path.read_text())) == cfg


def test_hf_bookkeeping_keys_are_accepted(tmp_path) -> None:
    data = {**ModelConfig().to_hf_dict(), "transformers_version": "4.50.0", "use_cache": True}
    assert ModelConfig.from_hf_dict(data) == ModelConfig()


def _write(tmp_path, **changes):
    data = {**ModelConfig().to_hf_dict(), **changes}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"sliding_window": 128}, "unknown field"),
        ({"tie_word_embeddings": False}, "tie_word_embeddings"),
        ({"attention_bias": True}, "attention_bias"),
        ({"num_attention_heads": 3}, "multiple"),
        ({"model_type": "llama"}, "model_type"),
        ({"architectures": ["LlamaForCausalLM"]}, "architectures"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"head_dim": 31}, "head_dim"),
        ({"exclusive_attention": "yes"}, "exclusive_attention"),
        ({"rope_theta": "2500"}, "rope_theta"),
        ({"rms_norm_eps": None}, "rms_norm_eps"),
        ({"rope_theta": -1.0}, "rope_theta"),
        ({"bos_token_id": "x"}, "bos_token_id"),
        ({"eos_token_id": 5000}, "eos_token_id"),
    ],
    ids=[
        "unknown",
        "untied",
        "bias",
        "heads-not-multiple",
        "model-type",
        "architectures",
        "zero",
        "odd-head-dim",
        "xsa-not-bool",
        "theta-string",
        "eps-null",
        "theta-negative",
        "bos-string",
        "eos-outside-vocab",
    ],
)
def test_bad_config_json_is_one_clear_error(tmp_path, changes, needle) -> None:
    path = _write(tmp_path, **changes)
    with pytest.raises(GptsError) as err:
        ModelConfig.load(path)
    msg = str(err.value)
    assert needle in msg and "\n" not in msg
    assert str(path) in msg or "config" in msg


def test_missing_and_malformed_config_json(tmp_path) -> None:
    with pytest.raises(GptsError, match="file not found"):
        ModelConfig.load(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(GptsError, match="not valid JSON"):
        ModelConfig.load(tmp_path / "config.json")
