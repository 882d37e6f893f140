"""Hugging Face folders: ``export_hf`` writes one that ``transformers`` loads with
``trust_remote_code=True``; ``import_hf`` turns such a folder back into our checkpoint.

Exported layout (everything a ``from_pretrained`` call needs, nothing fetched from the network):

    config.json               our config + auto_map to the remote-code files below
    configuration_gpts.py     GPTSConfig (PretrainedConfig), imports nothing from gpts_edge
    modeling_gpts.py          GPTSForCausalLM (PreTrainedModel + GenerationMixin, Cache API)
    model.safetensors         fp32, our checkpoint names (= HF llama names); no lm_head.weight:
                              the head is tied (tie_word_embeddings), transformers re-ties it
    tokenizer.json            our byte-level BPE
    tokenizer_config.json     PreTrainedTokenizerFast, bos/eos/pad = <|endoftext|>
    generation_config.json    our sampling defaults in GenerationConfig field names
    README.md                 a short model card with the usage snippet

Because the weights keep our names and the head is not stored, the exported folder is also a
valid gpts-edge checkpoint directory.

Neither direction needs torch or transformers: export copies files and import reads safetensors
with a small reader of its own, since numpy has no bfloat16 and a folder re-saved by
``save_pretrained`` after loading with ``torch_dtype=torch.bfloat16`` stores bf16 tensors.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from gpts_edge.checkpoint import (
    CONFIG_FILE,
    DEFAULT_GENERATION,
    GENERATION_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    load_checkpoint,
    save_checkpoint,
)
from gpts_edge.config import ModelConfig
from gpts_edge.errors import GptsError
from gpts_edge.fileio import atomic_dir, require_output_dir
from gpts_edge.names import expected_shapes
from gpts_edge.tokenizer import EOT, EOT_ID, load_tokenizer

REMOTE_DIR = Path(__file__).resolve().parent / "hf_remote"
REMOTE_FILES = ("configuration_gpts.py", "modeling_gpts.py")
AUTO_MAP = {
    "AutoConfig": "configuration_gpts.GPTSConfig",
    "AutoModelForCausalLM": "modeling_gpts.GPTSForCausalLM",
}
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
INDEX_FILE = "model.safetensors.index.json"
LM_HEAD = "lm_head.weight"
EMBED = "model.embed_tokens.weight"

# Sampling fields shared by our generation_config.json and transformers' GenerationConfig.
_GENERATION_KEYS = (
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "max_new_tokens",
)

_HF_GENERATION_DEFAULTS = {
    "do_sample": False,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
}

# Keys transformers writes into config.json on save_pretrained that carry no model information
# (beyond those ModelConfig.from_hf_dict already ignores). Anything else unknown is an error.
_HF_BOOKKEEPING_KEYS = (
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "id2label",
    "label2id",
    "problem_type",
    "tokenizer_class",
    "keys_to_ignore_at_inference",
    "add_cross_attention",
    "tf_legacy_loss",
    "use_bfloat16",
    "pruned_heads",
    "torchscript",
    "finetuning_task",
    "cross_attention_hidden_size",
    "decoder_start_token_id",
    "sep_token_id",
    "task_specific_params",
    "prefix",
    "is_decoder",
)

CARD_SNIPPET = """\
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(PATH, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True, torch_dtype=torch.bfloat16, device_map="auto")
inputs = tok("The future of AI is", return_tensors="pt").to(model.device)
out = model.generate(**inputs, max_new_tokens=40, do_sample=True, temperature=0.8, top_p=0.95, repetition_penalty=1.1, no_repeat_ngram_size=4)
print(tok.decode(out[0], skip_special_tokens=True))
"""


# --- export --------------------------------------------------------------------------------------
def hf_config_dict(cfg: ModelConfig) -> dict[str, Any]:
    data = cfg.to_hf_dict()
    data["auto_map"] = dict(AUTO_MAP)
    data["pad_token_id"] = cfg.eos_token_id
    data["use_cache"] = True
    return data


def hf_tokenizer_config(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOT,
        "eos_token": EOT,
        "pad_token": EOT,
        "model_max_length": cfg.context_length,
        # Left padding keeps every row's last token at the end, which batched generate needs.
        "padding_side": "left",
        # Byte-level BPE round-trips text exactly; HF's space clean-up would alter it.
        "clean_up_tokenization_spaces": False,
        "add_prefix_space": False,
        # transformers 4.x's PreTrainedTokenizerFast would also return token_type_ids, which
        # generate() rejects as an unused model argument.
        "model_input_names": ["input_ids", "attention_mask"],
    }


def hf_generation_config(generation: dict[str, Any], cfg: ModelConfig) -> dict[str, Any]:
    gen = {k: generation[k] for k in _GENERATION_KEYS if k in generation}
    # transformers applies top_k=50 when the field is absent; ours means "off" unless set.
    gen.setdefault("top_k", 0)
    gen.update(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.eos_token_id)
    return gen


def _model_card(cfg: ModelConfig) -> str:
    snippet = CARD_SNIPPET.replace("PATH", '"PATH/TO/THIS/FOLDER"')
    return (
        "---\nlibrary_name: transformers\npipeline_tag: text-generation\n---\n\n"
        "# GPT-S (XGQA)\n\n"
        f"A {cfg.num_parameters:,}-parameter causal LM with exclusive grouped-query attention, exported by "
        "`gpts-edge export --format hf`. Loading needs `trust_remote_code=True` (the architecture is in "
        "`modeling_gpts.py`, which depends only on torch and transformers).\n\n"
        f"```python\n{snippet}```\n"
    )


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def export_hf(model: str | Path | None, output: str | Path, log: Callable[[str], None] = print) -> Path:
    """Write a transformers folder for checkpoint ``model`` (default: bundled) at ``output``."""
    ckpt = load_checkpoint(model)
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise GptsError(f"{out}: exists and is not a directory (expected an output folder for --format hf)")
    require_output_dir(out.parent)
    for name in REMOTE_FILES:
        if not (REMOTE_DIR / name).is_file():
            raise GptsError(f"{REMOTE_DIR / name}: remote-code file missing from this installation")
    with atomic_dir(out) as tmp:
        cfg = ckpt.config
        _write_json(tmp / CONFIG_FILE, hf_config_dict(cfg))
        for name in REMOTE_FILES:
            shutil.copyfile(REMOTE_DIR / name, tmp / name)
        # Our checkpoint file already has HF names, fp32 and no head; copying keeps it byte-exact.
        shutil.copyfile(ckpt.path / WEIGHTS_FILE, tmp / WEIGHTS_FILE)
        shutil.copyfile(ckpt.tokenizer_path, tmp / TOKENIZER_FILE)
        _write_json(tmp / TOKENIZER_CONFIG_FILE, hf_tokenizer_config(cfg))
        _write_json(tmp / GENERATION_FILE, hf_generation_config(ckpt.generation, cfg))
        (tmp / "README.md").write_text(_model_card(cfg))
    log(f"wrote {out} (transformers folder, trust_remote_code; {cfg.num_parameters:,} parameters, fp32)")
    return out


# --- import --------------------------------------------------------------------------------------
_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as fp32 numpy arrays (F32, F16 and BF16 accepted)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise GptsError(f"{path}: cannot read ({exc.strerror})") from None
    if len(raw) < 8:
        raise GptsError(f"{path}: not a safetensors file (only {len(raw)} bytes)")
    (header_len,) = struct.unpack("<Q", raw[:8])
    if header_len > len(raw) - 8:
        raise GptsError(f"{path}: not a safetensors file (header length {header_len} exceeds the file size)")
    try:
        header = json.loads(raw[8 : 8 + header_len])
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise GptsError(f"{path}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise GptsError(f"{path}: not a safetensors file (header is not a JSON object)")
    data = memoryview(raw)[8 + header_len :]
    tensors: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], [int(s) for s in info["shape"]], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise GptsError(f"{path}: tensor {name!r}: malformed header entry") from None
        if dtype not in _ST_DTYPES:
            raise GptsError(f"{path}: tensor {name!r}: expected dtype F32, F16 or BF16, found {dtype}")
        np_dtype = np.dtype(_ST_DTYPES[dtype])
        count = int(np.prod(shape, dtype=np.int64))
        if not 0 <= start <= end <= len(data) or end - start != count * np_dtype.itemsize:
            raise GptsError(
                f"{path}: tensor {name!r}: data offsets {[start, end]} do not fit the file "
                f"(truncated or corrupt)"
            )
        arr = np.frombuffer(data[start:end], dtype=np_dtype).reshape(shape)
        if dtype == "BF16":
            # bf16 is the top half of an fp32: widening is exact.
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        tensors[name] = np.array(arr, dtype=np.float32)
    return tensors


def _read_weights(root: Path) -> dict[str, np.ndarray]:
    single, index = root / WEIGHTS_FILE, root / INDEX_FILE
    if single.is_file():
        return read_safetensors(single)
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            raise GptsError(f"{index}: expected JSON with a 'weight_map' object") from None
        weights: dict[str, np.ndarray] = {}
        for shard in shards:
            shard_path = root / shard
            if not shard_path.is_file():
                raise GptsError(f"{index}: names shard {shard!r}, which is missing")
            weights.update(read_safetensors(shard_path))
        return weights
    if any(root.glob("*.bin")) or any(root.glob("*.pt")):
        raise GptsError(
            f"{root}: only pickle weights (*.bin) found; re-save with safe_serialization=True "
            f"(safetensors), since pickle files are never loaded"
        )
    raise GptsError(f"{single}: file not found (expected the model weights in safetensors format)")


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise GptsError(f"{path}: file not found (expected {what})")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GptsError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise GptsError(f"{path}: expected a JSON object")
    return data


def _config_from_hf(path: Path) -> ModelConfig:
    data = _read_json(path, "a transformers config.json with model_type 'gpts'")
    if data.get("model_type") != "gpts":
        raise GptsError(f"{path}: field model_type: expected 'gpts', found {data.get('model_type')!r}")
    for key in _HF_BOOKKEEPING_KEYS:
        data.pop(key, None)
    for key in ("rope_parameters", "rope_scaling"):
        _check_plain_rope(path, key, data.pop(key, None), data)
    return ModelConfig.from_hf_dict(data, source=str(path))


def _check_plain_rope(path: Path, key: str, rope: Any, data: dict[str, Any]) -> None:
    if rope is not None:
        # Newer transformers may move rope_theta into rope_parameters; only plain RoPE is ours.
        if not isinstance(rope, dict) or rope.get("rope_type", rope.get("type", "default")) != "default":
            raise GptsError(f"{path}: field {key}: only default RoPE is supported, found {rope!r}")
        if "rope_theta" in rope:
            if "rope_theta" in data and data["rope_theta"] != rope["rope_theta"]:
                raise GptsError(
                    f"{path}: field {key}: rope_theta {rope['rope_theta']!r} contradicts "
                    f"rope_theta {data['rope_theta']!r}"
                )
            data["rope_theta"] = rope["rope_theta"]


def _generation_from_hf(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return dict(DEFAULT_GENERATION)
    data = _read_json(path, "generation_config.json")
    gen = {k: data[k] for k in _GENERATION_KEYS if k in data}
    # A field absent from a GenerationConfig means transformers' default, not ours: keep the
    # folder's behaviour (max_new_tokens excepted: transformers' max_length=20 counts the prompt).
    for key, hf_default in _HF_GENERATION_DEFAULTS.items():
        gen.setdefault(key, hf_default)
    return gen


def import_hf(source: str | Path, output: str | Path) -> Path:
    """Validate a transformers GPT-S folder (fp32, fp16 or bf16 weights) and write our checkpoint."""
    root = Path(source)
    if not root.is_dir():
        raise GptsError(
            f"{root}: expected a Hugging Face model folder (config.json, model.safetensors, tokenizer.json)"
        )
    cfg = _config_from_hf(root / CONFIG_FILE)
    weights = _read_weights(root)
    source_name = str(root / WEIGHTS_FILE)
    if LM_HEAD in weights:
        head = weights.pop(LM_HEAD)
        embed = weights.get(EMBED)
        if embed is None or head.shape != embed.shape or not np.array_equal(head, embed):
            raise GptsError(
                f"{source_name}: tensor {LM_HEAD!r} differs from {EMBED!r}; GPT-S needs a tied head "
                f"(tie_word_embeddings=true)"
            )
    unexpected = sorted(set(weights) - set(expected_shapes(cfg)))
    if unexpected:
        raise GptsError(
            f"{source_name}: unexpected tensor {unexpected[0]!r} (not part of a GPT-S model with this "
            f"config.json)"
        )
    bad = [n for n, v in weights.items() if not np.isfinite(v).all()]
    if bad:
        raise GptsError(f"{source_name}: tensor {bad[0]!r} contains NaN or infinity")
    tokenizer_path = root / TOKENIZER_FILE
    tok = load_tokenizer(tokenizer_path, vocab_size=cfg.vocab_size)
    del tok
    _check_tokenizer_config(root / TOKENIZER_CONFIG_FILE)
    generation = _generation_from_hf(root / GENERATION_FILE)
    out = Path(output)
    # save_checkpoint validates names, shapes and dtype and writes atomically.
    return save_checkpoint(out, cfg, weights, tokenizer_path, generation)


def _check_tokenizer_config(path: Path) -> None:
    """Special tokens, when given, must be the one our runtimes stop on."""
    if not path.is_file():
        return
    data = _read_json(path, "tokenizer_config.json")
    for key in ("bos_token", "eos_token"):
        value = data.get(key)
        if isinstance(value, dict):  # AddedToken serialised as an object
            value = value.get("content")
        if value is not None and value != EOT:
            raise GptsError(f"{path}: field {key}: expected {EOT!r} (id {EOT_ID}), found {value!r}")
