"""Checkpoint <-> GGUF (llama.cpp's format), and the GGUF parity report.

``export_gguf`` writes one self-contained file with gguf-py's ``GGUFWriter``: hyper-parameters
under ``<arch>.*``, tensors under llama.cpp's names (gpts_edge/names.py), the tokenizer as
``tokenizer.ggml.*``. ``arch="gpts"`` (default) keeps q/k rows in the checkpoint's rotate-half
layout and says ``gpts.attention.exclusive``; ``arch="llama"`` is only for plain-GQA checkpoints
(llama.cpp ignores unknown keys, so an XSA model labelled ``llama`` would run wrong) and permutes
q/k rows to GGML's interleaved RoPE layout, as llama.cpp's own converter does.

Quantization (q8_0, q4_0) is per 32-wide block along a row; a matrix whose rows are not a
multiple of 32 (GPT-S's ffn_down rows are 341 long) is stored as f16 and reported. 1-D norm
weights stay f32, as llama.cpp expects.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gpts_edge.checkpoint import Checkpoint, load_checkpoint
from gpts_edge.config import ModelConfig
from gpts_edge.constants import GGUF_SUFFIX
from gpts_edge.errors import GptsError
from gpts_edge.fileio import atomic_file
from gpts_edge.gguf_format import (
    TOKEN_TYPE_CONTROL,
    TOKEN_TYPE_NORMAL,
    TOKENIZER_MODEL,
    TOKENIZER_PRE,
    hparam_keys,
    permute_qk,
    read_gguf,
)
from gpts_edge.names import gguf_name
from gpts_edge.outputs import (
    CHECKPOINT_KIND,
    check_output_dir,
    check_output_file,
    export_folder,
    file_starts_with,
)

QUANTS = ("f32", "f16", "q8_0", "q4_0", "q4_mix")
# q4_mix: q4_0 except these tensors, kept at q8_0: the tied token embedding/output (a third of
# the weights, read at both ends of the model), attn_v (the values XSA divides by) and attn_k;
# docs/gguf.md has what each buys.
MIX_Q8_0 = ("token_embd.weight", ".attn_v.weight", ".attn_k.weight")
ARCHES = ("gpts", "llama")
BLOCK = 32
LICENSE = "apache-2.0"


@dataclass
class GGUFPlan:
    """Everything a GGUF file will hold, before writing (tests alter plans to make bad files)."""

    arch: str
    kv: list[tuple[str, Any, Any, Any]] = field(default_factory=list)  # key, value, type, sub_type
    tensors: list[tuple[str, np.ndarray, Any]] = field(default_factory=list)  # name, data, raw ggml type
    notes: list[str] = field(default_factory=list)


def _tokenizer_fields(tokenizer_path: Path, cfg: ModelConfig) -> tuple[list[str], list[int], list[str]]:
    """tokens, token types and merges from a tokenizer.json of the layout this project trains."""
    try:
        data = json.loads(tokenizer_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GptsError(f"{tokenizer_path}: not readable JSON ({exc})") from None
    model = data.get("model") or {}
    pre = data.get("pre_tokenizer") or {}
    problems = []
    if model.get("type") != "BPE":
        problems.append(f"model.type {model.get('type')!r} (expected 'BPE')")
    if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") or not pre.get("use_regex", True):
        problems.append("pre_tokenizer (expected ByteLevel, add_prefix_space false, use_regex true)")
    if data.get("normalizer") is not None:
        problems.append("a normalizer")
    if data.get("post_processor") is not None:
        problems.append("a post_processor")
    for key in (
        "byte_fallback",
        "ignore_merges",
        "continuing_subword_prefix",
        "end_of_word_suffix",
        "dropout",
    ):
        if model.get(key):
            problems.append(f"model.{key}")
    if problems:
        raise GptsError(
            f"{tokenizer_path}: cannot be written as tokenizer.ggml ({TOKENIZER_MODEL}): "
            f"unsupported {', '.join(problems)}"
        )
    by_id: dict[int, str] = {i: t for t, i in model.get("vocab", {}).items()}
    types = {i: TOKEN_TYPE_NORMAL for i in by_id}
    for tok in data.get("added_tokens", []):
        if not tok.get("special"):
            raise GptsError(
                f"{tokenizer_path}: added token {tok.get('content')!r} is not special; only special "
                "(control) added tokens are supported"
            )
        by_id[tok["id"]] = tok["content"]
        types[tok["id"]] = TOKEN_TYPE_CONTROL
    if sorted(by_id) != list(range(cfg.vocab_size)):
        raise GptsError(
            f"{tokenizer_path}: token ids must be exactly 0..{cfg.vocab_size - 1} (config vocab_size), "
            f"found {len(by_id)} ids"
        )
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return [by_id[i] for i in range(cfg.vocab_size)], [types[i] for i in range(cfg.vocab_size)], merges


def plan_gguf(ckpt: Checkpoint, quant: str = "f32", arch: str = "gpts") -> GGUFPlan:
    import gguf

    if quant not in QUANTS:
        raise GptsError(f"--quant: unknown GGUF quantization {quant!r}; choose from {', '.join(QUANTS)}")
    if arch not in ARCHES:
        raise GptsError(f"--arch: unknown GGUF architecture {arch!r}; choose from {', '.join(ARCHES)}")
    cfg = ckpt.config
    if arch == "llama" and cfg.exclusive_attention:
        raise GptsError(
            f"{ckpt.path}: --arch llama refused: this checkpoint uses exclusive attention (XSA, "
            "exclusive_attention: true), which llama.cpp's llama architecture does not implement, so "
            "the file would run wrong; export with --arch gpts"
        )
    T = gguf.GGUFValueType
    Q = gguf.GGMLQuantizationType
    plan = GGUFPlan(arch)
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
        "q4_mix": gguf.LlamaFileType.MOSTLY_Q4_0,  # llama.cpp labels mixes by their main type
    }[quant]
    name = "GPT-S-1.4M" if ckpt.path.name == "default_model" else ckpt.path.name
    plan.kv += [
        ("general.type", "model", T.STRING, None),
        ("general.name", name, T.STRING, None),
        ("general.license", LICENSE, T.STRING, None),
        ("general.file_type", int(file_type), T.UINT32, None),
        ("general.quantization_version", gguf.GGML_QUANT_VERSION, T.UINT32, None),
    ]
    keys = hparam_keys(arch)
    for fname, key in keys.items():
        value = getattr(cfg, fname)
        plan.kv.append(
            (key, float(value), T.FLOAT32, None)
            if isinstance(value, float)
            else (key, int(value), T.UINT32, None)
        )
    plan.kv.append((f"{arch}.attention.value_length", cfg.head_dim, T.UINT32, None))
    plan.kv.append((f"{arch}.rope.dimension_count", cfg.head_dim, T.UINT32, None))
    if arch == "gpts":
        plan.kv.append(("gpts.attention.exclusive", bool(cfg.exclusive_attention), T.BOOL, None))
    tokens, types, merges = _tokenizer_fields(ckpt.tokenizer_path, cfg)
    plan.kv += [
        ("tokenizer.ggml.model", TOKENIZER_MODEL, T.STRING, None),
        ("tokenizer.ggml.pre", TOKENIZER_PRE, T.STRING, None),
        ("tokenizer.ggml.tokens", tokens, T.ARRAY, T.STRING),
        ("tokenizer.ggml.token_type", types, T.ARRAY, T.INT32),
        ("tokenizer.ggml.merges", merges, T.ARRAY, T.STRING),
        ("tokenizer.ggml.bos_token_id", cfg.bos_token_id, T.UINT32, None),
        ("tokenizer.ggml.eos_token_id", cfg.eos_token_id, T.UINT32, None),
        # The model is trained without a BOS prefix: llama.cpp must not add one.
        ("tokenizer.ggml.add_bos_token", False, T.BOOL, None),
    ]
    g = ckpt.generation
    plan.kv += [
        (
            "general.sampling.temp",
            float(g.get("temperature", 0.8)) if g.get("do_sample", True) else 0.0,
            T.FLOAT32,
            None,
        ),
        ("general.sampling.top_k", int(g.get("top_k", 0) or 0), T.INT32, None),
        ("general.sampling.top_p", float(g.get("top_p", 1.0)), T.FLOAT32, None),
        ("general.sampling.penalty_repeat", float(g.get("repetition_penalty", 1.0)), T.FLOAT32, None),
    ]
    main_type = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_mix": Q.Q4_0}[quant]
    f16_fallback = []
    for ck_name, w in ckpt.weights.items():
        gname = gguf_name(ck_name)  # a name missing from the table raises, never skipped
        qtype = main_type
        if quant == "q4_mix" and gname.endswith(MIX_Q8_0):
            qtype = Q.Q8_0
        w = np.asarray(w, dtype=np.float32)
        if arch == "llama" and ck_name.endswith(("q_proj.weight", "k_proj.weight")):
            w = permute_qk(w, cfg.num_heads if "q_proj" in ck_name else cfg.num_kv_heads)
        if w.ndim == 1 or qtype == Q.F32:
            plan.tensors.append((gname, np.ascontiguousarray(w), Q.F32))
        elif qtype == Q.F16:
            plan.tensors.append((gname, w.astype(np.float16), Q.F16))
        elif w.shape[-1] % BLOCK:
            f16_fallback.append(f"{gname} (rows of {w.shape[-1]})")
            plan.tensors.append((gname, w.astype(np.float16), Q.F16))
        else:
            plan.tensors.append((gname, gguf.quants.quantize(w, qtype), qtype))
    if f16_fallback:
        plan.notes.append(
            f"{quant}: rows not a multiple of {BLOCK}, stored as f16: {', '.join(f16_fallback)}"
        )
    return plan


def check_gguf_output(output: str | Path, *, force: bool = False) -> Path:
    """A .gguf path (any name with ``force``) that is new or a GGUF file (any file with ``force``)."""
    return check_output_file(
        output, GGUF_SUFFIX, force=force, same_format=file_starts_with(b"GGUF"), what="GGUF file"
    )


def write_plan(plan: GGUFPlan, output: str | Path, *, force: bool = False) -> Path:
    """Write atomically: a temp file in the output's directory, then rename over ``output``."""
    import gguf

    output = check_gguf_output(output, force=force)
    try:
        with atomic_file(output) as tmp:
            writer = gguf.GGUFWriter(tmp, plan.arch)
            for key, value, vtype, sub in plan.kv:
                writer.add_key_value(key, value, vtype, sub_type=sub)
            for name, data, qtype in plan.tensors:
                writer.add_tensor(name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
    except OSError as exc:
        raise GptsError(f"{output.parent}: cannot write the export ({exc.strerror or exc})") from None
    return output


def export_gguf(
    model: str | Path | None,
    output: str | Path,
    *,
    quant: str = "f32",
    arch: str = "gpts",
    log: Callable[[str], None] = print,
    force: bool = False,
) -> Path:
    """Export a checkpoint directory (None: the bundled model) to one GGUF file."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise GptsError("GGUF export needs the 'gguf' package (pip install 'gpts-edge[export]')") from None
    check_gguf_output(output, force=force)
    ckpt = load_checkpoint(model)
    plan = plan_gguf(ckpt, quant, arch)
    for note in plan.notes:
        log(note)
    out = write_plan(plan, output, force=force)
    log(f"wrote {out} ({out.stat().st_size:,} bytes, arch {arch}, {quant})")
    return out


def import_gguf(
    source: str | Path, output: str | Path, log: Callable[[str], None] | None = None, *, force: bool = False
) -> Path:
    """A GGUF file -> checkpoint directory (fp32; quantized tensors are dequantized, and
    ``log`` (default: stderr) says so)."""
    from gpts_edge.checkpoint import save_checkpoint

    if log is None:
        log = _stderr
    output = Path(output)
    check_output_dir(output, CHECKPOINT_KIND, force=force)
    m = read_gguf(source)
    lossy = sorted({t for t in m.tensor_types.values() if t != "F32"})
    if lossy:
        log(
            f"{source}: tensors stored as {', '.join(lossy)} are dequantized to f32 (not the original weights)"
        )
    with export_folder(output, CHECKPOINT_KIND, force=force) as tmp:
        tok = tmp / ".tokenizer.json.tok"  # read by save_checkpoint, gone with tmp's swap
        tok.write_text(m.tokenizer_json + "\n", encoding="utf-8")
        save_checkpoint(tmp, m.config, m.weights, tok, m.generation)
    return output


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)
