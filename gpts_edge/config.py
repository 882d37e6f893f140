"""The one model configuration: a frozen dataclass whose defaults are GPT-S-1.4M.

It round-trips a Hugging Face style ``config.json`` (HF field names, ``model_type: "gpts"``).
Anything unknown or contradictory in such a file is an error, never silently dropped.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpts_edge.errors import GptsError
from gpts_edge.fileio import read_text

MODEL_TYPE = "gpts"
# 64 Ki positions: 256x the trained context. Larger values are mistakes (or attacks) that would
# only fail later, as a MemoryError allocating the KV cache or the rotary tables.
MAX_CONTEXT = 1 << 16
# Bounds on the other sizes for the same reason (a 4 GB embedding is far outside this family).
MAX_SIZE = 1 << 20
ARCHITECTURE = "GPTSForCausalLM"


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 4096
    hidden_size: int = 128
    num_layers: int = 5
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 341
    context_length: int = 384
    rope_theta: float = 2500.0
    rms_norm_eps: float = 1e-6
    exclusive_attention: bool = True
    bos_token_id: int = 0
    eos_token_id: int = 0

    def __post_init__(self) -> None:
        positive = (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "intermediate_size",
            "context_length",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise GptsError(f"config field {name}: expected a positive integer, found {value!r}")
            limit = MAX_CONTEXT if name == "context_length" else MAX_SIZE
            if value > limit:
                hf = "max_position_embeddings" if name == "context_length" else name
                raise GptsError(f"config field {hf}: expected at most {limit:,}, found {value:,}")
        if self.num_heads % self.num_kv_heads:
            raise GptsError(
                f"config: num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise GptsError(
                f"config field head_dim: rotary embedding needs an even value, found {self.head_dim}"
            )
        for name in ("rope_theta", "rms_norm_eps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise GptsError(f"config field {name}: expected a positive number, found {value!r}")
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < self.vocab_size:
                raise GptsError(
                    f"config field {name}: expected a token id in 0..{self.vocab_size - 1}, found {value!r}"
                )

    @property
    def group_size(self) -> int:
        """Query heads per KV head; query head h reads KV head h // group_size."""
        return self.num_heads // self.num_kv_heads

    @property
    def num_parameters(self) -> int:
        """Parameter count with the tied head counted once."""
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * self.num_heads * hd * 2 + d * self.num_kv_heads * hd * 2
        per_layer = attn + 3 * d * f + 2 * d
        return self.vocab_size * d + self.num_layers * per_layer + d

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # --- config.json -------------------------------------------------------------------------
    def to_hf_dict(self) -> dict[str, Any]:
        return {
            "architectures": [ARCHITECTURE],
            "model_type": MODEL_TYPE,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.context_length,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": True,
            "attention_bias": False,
            "mlp_bias": False,
            "hidden_act": "silu",
            "exclusive_attention": self.exclusive_attention,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": "float32",
        }

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], source: str = "config.json") -> ModelConfig:
        if not isinstance(data, dict):
            raise GptsError(f"{source}: expected a JSON object, found {type(data).__name__}")
        data = dict(data)
        model_type = data.pop("model_type", None)
        if model_type != MODEL_TYPE:
            raise GptsError(f"{source}: field model_type: expected {MODEL_TYPE!r}, found {model_type!r}")
        archs = data.pop("architectures", [ARCHITECTURE])
        if archs != [ARCHITECTURE]:
            raise GptsError(f"{source}: field architectures: expected [{ARCHITECTURE!r}], found {archs!r}")
        fixed = {
            "tie_word_embeddings": True,
            "attention_bias": False,
            "mlp_bias": False,
            "hidden_act": "silu",
        }
        for key, expected in fixed.items():
            if key in data and data.pop(key) != expected:
                raise GptsError(f"{source}: field {key}: this architecture supports only {expected!r}")
        # Keys HF tooling adds that carry no model information.
        for key in (
            "torch_dtype",
            "dtype",
            "transformers_version",
            "auto_map",
            "use_cache",
            "pad_token_id",
            "_name_or_path",
            "initializer_range",
        ):
            data.pop(key, None)
        kwargs: dict[str, Any] = {}
        for hf_key, field in _HF_TO_FIELD.items():
            if hf_key in data:
                kwargs[field] = data.pop(hf_key)
        if data:
            raise GptsError(f"{source}: unknown field(s) {sorted(data)}")
        for key in ("rope_theta", "rms_norm_eps"):
            if key in kwargs and isinstance(kwargs[key], int) and not isinstance(kwargs[key], bool):
                kwargs[key] = float(kwargs[key])
        if "exclusive_attention" in kwargs and not isinstance(kwargs["exclusive_attention"], bool):
            raise GptsError(f"{source}: field exclusive_attention: expected true/false")
        return cls(**kwargs)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if not path.is_file():
            raise GptsError(f"{path}: file not found (expected a model config.json)")
        try:
            data = json.loads(read_text(path))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise GptsError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_hf_dict(data, source=str(path))


_HF_TO_FIELD = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "num_key_value_heads": "num_kv_heads",
    "head_dim": "head_dim",
    "intermediate_size": "intermediate_size",
    "max_position_embeddings": "context_length",
    "rope_theta": "rope_theta",
    "rms_norm_eps": "rms_norm_eps",
    "exclusive_attention": "exclusive_attention",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
}

PRESETS: dict[str, ModelConfig] = {
    "gpt-s-1.4m": ModelConfig(),
    # Small enough that tests train it in seconds; same shape rules as the real model.
    "tiny": ModelConfig(
        vocab_size=4096,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        intermediate_size=48,
        context_length=64,
    ),
}
