"""ONNX export of a checkpoint: the folder a user runs (graph, decode flavour, sidecars for
onnxruntime-genai and transformers.js), written atomically. The graph itself is built in
export/onnx_graph.py, its quantized weights in export/onnx_quant.py."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpts_edge.checkpoint import GENERATION_FILE, TOKENIZER_FILE, Checkpoint, load_checkpoint
from gpts_edge.config import ModelConfig
from gpts_edge.constants import CONFIG_FILE, DECODE_SUFFIX, GENAI_FILE, LAST_LOGITS_SUFFIX, flavour_file
from gpts_edge.constants import ONNX_MODEL_FILE as MODEL_FILE
from gpts_edge.errors import GptsError
from gpts_edge.export.onnx_distill import quantization_inputs
from gpts_edge.export.onnx_graph import (
    DEFAULT_OPSET,
    MIN_OPSET,
    build_model,
    check_model,
    decode_supported,
    max_supported_opset,
)
from gpts_edge.export.onnx_quant import Int4Scheme
from gpts_edge.fileio import atomic_file, require_output_dir, temp_dir_beside
from gpts_edge.names import (
    ONNX_ATTENTION_MASK,
    ONNX_INPUT_IDS,
    ONNX_LOGITS,
    ONNX_PAST_KEY,
    ONNX_PAST_VALUE,
    ONNX_POSITION_IDS,
    ONNX_PRESENT_KEY,
    ONNX_PRESENT_VALUE,
)
from gpts_edge.outputs import (
    ONNX_KIND,
    check_output_dir,
    clean_stale,
    export_folder,
    file_starts_with,
    onnx_files,
)

QUANTIZATIONS = ("none", "int8", "int4")

# --- folder writing -------------------------------------------------------------------------------


def genai_config(cfg: ModelConfig, generation: dict[str, Any], model_file: str) -> dict[str, Any]:
    """onnxruntime-genai's genai_config.json for our graph (generic decoder, growing KV cache)."""
    return {
        "model": {
            "bos_token_id": cfg.bos_token_id,
            "context_length": cfg.context_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": model_file,
                "head_size": cfg.head_dim,
                "hidden_size": cfg.hidden_size,
                "inputs": {
                    "input_ids": ONNX_INPUT_IDS,
                    "attention_mask": ONNX_ATTENTION_MASK,
                    "position_ids": ONNX_POSITION_IDS,
                    "past_key_names": ONNX_PAST_KEY.replace("{i}", "%d"),
                    "past_value_names": ONNX_PAST_VALUE.replace("{i}", "%d"),
                },
                "outputs": {
                    "logits": ONNX_LOGITS,
                    "present_key_names": ONNX_PRESENT_KEY.replace("{i}", "%d"),
                    "present_value_names": ONNX_PRESENT_VALUE.replace("{i}", "%d"),
                },
                "num_attention_heads": cfg.num_heads,
                "num_hidden_layers": cfg.num_layers,
                "num_key_value_heads": cfg.num_kv_heads,
            },
            "eos_token_id": cfg.eos_token_id,
            "pad_token_id": cfg.eos_token_id,
            "type": "decoder",
            "vocab_size": cfg.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": bool(generation.get("do_sample", True)),
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": cfg.context_length,
            "min_length": 0,
            "no_repeat_ngram_size": int(generation.get("no_repeat_ngram_size", 0) or 0),
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "repetition_penalty": float(generation.get("repetition_penalty", 1.0)),
            "temperature": float(generation.get("temperature", 1.0)),
            "top_k": int(generation.get("top_k", 0) or 0),
            "top_p": float(generation.get("top_p", 1.0)),
        },
    }


def _write_atomic(path: Path, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def _resolve_output(output: str | Path, force: bool) -> tuple[Path, bool]:
    """(the graph's path, whether the export is a folder of its own). A folder (existing, or a
    new path without a suffix) is swapped in whole; a ``.onnx`` path writes beside files that
    belong to someone else, so it must not replace any of them unless they are this export's."""
    out = Path(output)
    if out.is_dir() or (not out.exists() and out.suffix == ""):
        check_output_dir(out, ONNX_KIND, force=force)
        return out / MODEL_FILE, True
    if out.suffix != ".onnx" and not force:
        raise GptsError(f"{out}: expected a .onnx file path or a folder (or pass --force)")
    require_output_dir(out.parent)
    clean_stale(out)
    if not force:
        # Sidecars (config.json, tokenizer.json...) are shared names: replace them only when
        # they sit beside a previous export of this graph, never beside someone else's files.
        owned = onnx_files(out.name)
        taken = sorted(n for n in owned if (out.parent / n).exists())
        is_graph = file_starts_with(b"\x08")  # an ONNX ModelProto opens with ir_version (field 1)
        if taken and not any(is_graph(p) for p in out.parent.glob("*.onnx")):
            raise GptsError(
                f"{out.parent}: already holds {', '.join(taken[:3])} and no ONNX export; "
                "export into a folder of its own, or pass --force to replace them"
            )
    return out, False


def export_onnx(
    model: str | Path | None,
    output: str | Path,
    *,
    quantize: str = "none",
    opset: int | None = None,
    log: Callable[[str], None] = print,
    last_logits_graph: bool = False,
    decode_graph: bool = False,
    force: bool = False,
    scheme: Int4Scheme | None = None,
) -> Path:
    """Export a checkpoint (None: the bundled one) to ``output`` (.onnx) plus its sidecar files.

    ``last_logits_graph`` also writes ``<name>.last_logits.onnx``, the flavour whose ``logits`` hold
    only the last position; ``decode_graph`` also writes ``<name>.decode.onnx``, the runtime's
    fast step flavour (``build_model(flavour="decode")``; ``gpts-edge export`` and the user cache
    ask for it, this function's default does not). A flavour holds no copy of the weights it
    shares with the full graph: it reads them from ``<name>.onnx`` (see share_weights).
    gpts_edge.runtimes.onnx steps with the decode flavour when present, else with the last-logits
    one, else with the full graph.
    """
    if quantize not in QUANTIZATIONS:
        raise GptsError(
            f"--quantize: unknown quantization {quantize!r}; choose from {', '.join(QUANTIZATIONS)}"
        )
    out, own_folder = _resolve_output(output, force)
    top = max_supported_opset()
    opset = DEFAULT_OPSET if opset is None else opset
    if not MIN_OPSET <= opset <= top:
        raise GptsError(
            f"--opset: expected {MIN_OPSET}..{top} (RMSNormalization, RotaryEmbedding and "
            f"Attention need opset {MIN_OPSET}), found {opset}"
        )
    log("[1/4] loading checkpoint")
    ckpt = load_checkpoint(model)
    log(f"[2/4] building graph ({quantize}, opset {opset})")
    weights, hessians, scheme = quantization_inputs(
        ckpt.config, ckpt.weights, ckpt.tokenizer, quantize, scheme, log
    )
    proto = build_model(
        ckpt.config, weights, quantize=quantize, opset=opset, hessians=hessians, scheme=scheme
    )
    log(f"[3/4] checking graph ({len(proto.graph.node)} nodes)")
    check_model(proto)
    data = proto.SerializeToString()
    sidecars = _sidecar_files(ckpt, out.name)
    if decode_graph and not decode_supported(ckpt.config):
        log(
            f"       no decode graph: head_dim {ckpt.config.head_dim} is not a multiple of 16; last-logits graph instead"
        )
        decode_graph, last_logits_graph = False, True
    flavours: dict[str, dict[str, Any]] = {}
    if last_logits_graph:
        flavours[flavour_file(out.name, LAST_LOGITS_SUFFIX)] = {"last_logits_only": True}
    if decode_graph:
        flavours[flavour_file(out.name, DECODE_SUFFIX)] = {"flavour": "decode"}
    for name, kwargs in flavours.items():
        fast = build_model(
            ckpt.config,
            weights,
            quantize=quantize,
            opset=opset,
            hessians=hessians,
            scheme=scheme,
            **kwargs,
        )
        check_model(fast)  # checked whole, before its weights become references into the full graph
        saved = share_weights(fast, proto, data, out.name)
        sidecars[name] = fast.SerializeToString()
        log(
            f"       {name}: {len(fast.graph.node)} nodes, {len(sidecars[name]):,} bytes ({saved:,} read from {out.name})"
        )
    log(f"[4/4] writing {out} ({len(data):,} bytes) and sidecar files")
    sidecars[out.name] = data  # last: a folder holding the graph holds its sidecars too
    try:
        if own_folder:
            with export_folder(out.parent, ONNX_KIND, force=force) as tmp:
                for name, content in sidecars.items():
                    (tmp / name).write_bytes(content)
        else:
            # A flavour this export does not write must not outlive it: one left from an earlier
            # export would be stepped with instead of this graph.
            for name in (flavour_file(out.name, LAST_LOGITS_SUFFIX), flavour_file(out.name, DECODE_SUFFIX)):
                if name not in sidecars:
                    (out.parent / name).unlink(missing_ok=True)
            for name, content in sidecars.items():
                _write_atomic(out.parent / name, content)
    except OSError as exc:
        raise GptsError(f"{out.parent}: cannot write the export ({exc.strerror or exc})") from None
    return out


# Tensors smaller than this stay inside the flavour: a reference costs about as many bytes.
MIN_SHARED_BYTES = 128


def share_weights(flavour: Any, full: Any, full_bytes: bytes, model_file: str) -> int:
    """Store each weight once: every initializer of ``flavour`` that ``full`` holds too (same
    name, type, shape and bytes) becomes ONNX external data pointing at those bytes inside
    ``full_bytes``, the serialized full graph that is written as ``model_file`` beside it. The
    full graph stays one self-contained file (what onnxruntime-genai, transformers.js and the
    browser page load); the flavour records the full graph's sha256 so a reader can refuse one
    left over from another export. Returns the bytes the flavour no longer carries."""
    from onnx import TensorProto

    from gpts_edge.names import ONNX_META_WEIGHTS_FILE, ONNX_META_WEIGHTS_SHA256

    mine = {t.name: t for t in full.graph.initializer}
    saved = 0
    for t in flavour.graph.initializer:
        other = mine.get(t.name)
        if (
            other is None
            or len(t.raw_data) < MIN_SHARED_BYTES
            or (t.data_type, list(t.dims), t.raw_data) != (other.data_type, list(other.dims), other.raw_data)
        ):
            continue
        # Any place holding exactly these bytes serves; the first is the tensor's own raw_data
        # (or an identical copy of it).
        offset = full_bytes.find(t.raw_data)
        if offset < 0:  # cannot happen for a serialized raw_data field; kept inline if it does
            continue
        length = len(t.raw_data)
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", model_file), ("offset", str(offset)), ("length", str(length))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        saved += length
    if saved:
        meta = {
            ONNX_META_WEIGHTS_FILE: model_file,
            ONNX_META_WEIGHTS_SHA256: hashlib.sha256(full_bytes).hexdigest(),
        }
        for key, value in meta.items():
            entry = flavour.metadata_props.add()
            entry.key, entry.value = key, value
    return saved


def _sidecar_files(ckpt: Checkpoint, model_file: str) -> dict[str, bytes]:
    # onnxruntime-genai's og.Tokenizer (and transformers.js) refuse a folder without it.
    from gpts_edge.export.hf import TOKENIZER_CONFIG_FILE, hf_tokenizer_config

    gen = dict(ckpt.generation)
    return {
        CONFIG_FILE: (json.dumps(ckpt.config.to_hf_dict(), indent=2) + "\n").encode(),
        TOKENIZER_FILE: ckpt.tokenizer_path.read_bytes(),
        TOKENIZER_CONFIG_FILE: (json.dumps(hf_tokenizer_config(ckpt.config), indent=2) + "\n").encode(),
        GENERATION_FILE: (json.dumps(gen, indent=2) + "\n").encode(),
        GENAI_FILE: (json.dumps(genai_config(ckpt.config, gen, model_file), indent=2) + "\n").encode(),
    }


def export_to_folder(
    model: str | Path | None, folder: Path, *, quantize: str = "none", log: Callable[[str], None] = print
) -> Path:
    """Export into a fresh folder atomically (temp folder beside it, then rename); used by caches."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(folder)  # temp folders of killed exports into this cache entry
    tmp = temp_dir_beside(folder)
    try:
        export_onnx(model, tmp / MODEL_FILE, quantize=quantize, log=log, decode_graph=True, force=True)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / MODEL_FILE).is_file():  # lost a race to another process: theirs is fine
                raise
    finally:
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return folder / MODEL_FILE
