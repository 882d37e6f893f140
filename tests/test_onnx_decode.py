"""The decode flavour (model.decode.onnx): what OnnxRuntime steps with when an export has it.

It is a different graph from the compatible export (GroupQueryAttention over a fixed KV buffer
updated in place, IO binding, last-position logits), so it gets its own parity checks against
PyTorch on the peaky tiny model (large logits, so the 1e-4 bound means something), plus the cache
semantics that in-place updates could break: branching from an older cache, prompts fed in chunks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("torch")

from gpts_edge.checkpoint import default_model_dir, load_checkpoint, save_checkpoint  # noqa: E402
from gpts_edge.config import PRESETS  # noqa: E402
from gpts_edge.errors import GptsError  # noqa: E402
from gpts_edge.export.onnx import export_onnx  # noqa: E402
from gpts_edge.export.onnx_graph import build_model  # noqa: E402
from gpts_edge.generation import generate_ids  # noqa: E402
from gpts_edge.names import ONNX_DECODE_SEQLENS_K as DECODE_SEQLENS_K  # noqa: E402
from gpts_edge.names import ONNX_DECODE_TOTAL_LENGTH as DECODE_TOTAL_LENGTH  # noqa: E402
from gpts_edge.parity import FP32_TOL, bounds, text_figures, text_windows  # noqa: E402
from gpts_edge.runtimes.onnx import OnnxDecodeCache, OnnxRuntime  # noqa: E402
from gpts_edge.sampling import SamplingOptions  # noqa: E402
from gpts_edge.torch_runtime import TorchRuntime  # noqa: E402
from tests.test_onnx_export import peaky_checkpoint, quiet  # noqa: E402  (head_dim 8)


def peaky16(out: Path) -> Path:
    """The peaky tiny model with head_dim 16 (GroupQueryAttention's smallest head size)."""
    from gpts_edge.model import GPTS, state_to_weights

    cfg = PRESETS["tiny"].replace(head_dim=16, context_length=384)
    w = state_to_weights(GPTS(cfg).init_weights(0))
    for k, v in w.items():
        if "embed" in k:
            w[k] = v * 25
        elif "q_proj" in k or "k_proj" in k:
            w[k] = v * 12  # sharp attention, so positions and the cache matter
        elif v.ndim == 2:
            w[k] = v * 6
    return save_checkpoint(out, cfg, w, default_model_dir() / "tokenizer.json")


@pytest.fixture(scope="session")
def peaky_dec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return peaky16(tmp_path_factory.mktemp("onnx-dec") / "peaky16")


@pytest.fixture(scope="session")
def dec_folder(peaky_dec: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx-dec") / "model.onnx"
    return export_onnx(peaky_dec, out, log=quiet, decode_graph=True).parent


@pytest.fixture(scope="session")
def pair(peaky_dec: Path, dec_folder: Path) -> tuple[OnnxRuntime, TorchRuntime]:
    return OnnxRuntime(dec_folder), TorchRuntime(peaky_dec)


def ids_of(rt: OnnxRuntime, n: int) -> np.ndarray:
    return text_windows(rt.tokenizer, 64, min_positions=n).reshape(-1)[:n]


def run_steps(rt, ref, ids, cache_o, cache_t):
    worst = 0.0
    for t in ids:
        lo, cache_o = rt.step(np.array([t]), cache_o)
        lt, cache_t = ref.step(np.array([t]), cache_t)
        worst = max(worst, float(np.abs(lo - lt).max()))
    return worst, cache_o, cache_t


def test_decode_graph_io_is_the_documented_layout(dec_folder: Path) -> None:
    model = onnx.load(str(dec_folder / "model.decode.onnx"))
    onnx.checker.check_model(model, full_check=True)

    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    ins = {i.name: dims(i) for i in model.graph.input}
    outs = {o.name: dims(o) for o in model.graph.output}
    assert list(ins)[:3] == ["input_ids", DECODE_SEQLENS_K, DECODE_TOTAL_LENGTH]
    assert ins["input_ids"] == [1, "sequence_length"] and ins[DECODE_TOTAL_LENGTH] == []
    cfg = PRESETS["tiny"].replace(head_dim=16, context_length=384)
    assert ins["past_key_values.0.key"] == [1, cfg.num_kv_heads, "max_sequence_length", cfg.head_dim]
    assert outs["present.0.key"] == ins["past_key_values.0.key"]  # the same buffer, bound twice
    assert outs["logits"] == [1, 1, 4096]
    ops = [n.op_type for n in model.graph.node]
    assert (
        ops.count("GroupQueryAttention") == cfg.num_layers
        and "Attention" not in ops
        and "RotaryEmbedding" not in ops
    )
    full = onnx.load(str(dec_folder / "model.onnx"))
    assert len(ops) < len(full.graph.node) - 15  # no mask subgraph, fused rotary, shorter XSA
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["gpts.flavour"] == "decode"


def test_runtime_steps_with_decode_graph_and_opens_full_graph_only_for_scoring(dec_folder: Path) -> None:
    rt = OnnxRuntime(dec_folder)
    assert rt._session is None
    logits, cache = rt.step(np.array([5, 6, 7]), rt.new_cache())
    assert isinstance(cache, OnnxDecodeCache) and cache.length == 3 and logits.shape == (4096,)
    assert rt._session is None
    full = rt.forward_logits(np.array([[5, 6, 7]]))
    assert rt._session is not None
    assert np.abs(full[0, -1] - logits).max() <= FP32_TOL


def test_decode_prefill_64_then_32_steps_match_torch(pair) -> None:
    rt, ref = pair
    ids = ids_of(rt, 96)
    lo, co = rt.step(ids[:64], rt.new_cache())
    lt, ct = ref.step(ids[:64], ref.new_cache())
    assert np.abs(lt).max() > 10  # the bound is small next to the logits
    worst, _, _ = run_steps(rt, ref, ids[64:], co, ct)
    assert max(worst, float(np.abs(lo - lt).max())) <= FP32_TOL


def test_decode_prompt_in_chunks_after_a_cache_matches_torch(pair) -> None:
    rt, ref = pair
    ids = ids_of(rt, 90)
    co, ct = rt.new_cache(), ref.new_cache()
    for lo_, hi in ((0, 30), (30, 31), (31, 70), (70, 90)):
        lo, co = rt.step(ids[lo_:hi], co)
        lt, ct = ref.step(ids[lo_:hi], ct)
        assert np.abs(lo - lt).max() <= FP32_TOL, (lo_, hi)


def test_stepping_again_from_an_older_cache_branches_without_corrupting_either(pair) -> None:
    rt, ref = pair
    ids = ids_of(rt, 60)
    base_o, base_t = rt.step(ids[:40], rt.new_cache())[1], ref.step(ids[:40], ref.new_cache())[1]
    _, newer_o, newer_t = run_steps(rt, ref, ids[40:50], base_o, base_t)
    # base_o is now stale (its buffer moved on in place): a different continuation from it ...
    other = ids[::-1][:5]
    worst_branch, _, _ = run_steps(rt, ref, other, base_o, base_t)
    # ... and the newer cache still continues as if nothing happened.
    worst_newer, _, _ = run_steps(rt, ref, ids[50:60], newer_o, newer_t)
    assert worst_branch <= FP32_TOL and worst_newer <= FP32_TOL


def test_decode_context_edge_matches_torch_and_one_more_token_fails_clearly(pair) -> None:
    rt, ref = pair
    ctx = rt.config.context_length
    ids = text_windows(rt.tokenizer, ctx, min_positions=ctx)[0]
    lo, co = rt.step(ids[: ctx - 6], rt.new_cache())
    lt, ct = ref.step(ids[: ctx - 6], ref.new_cache())
    worst, co, _ = run_steps(rt, ref, ids[ctx - 6 :], co, ct)
    assert max(worst, float(np.abs(lo - lt).max())) <= FP32_TOL
    assert co.length == ctx
    with pytest.raises(GptsError, match=f"longer than the context \\(expected at most {ctx}\\)"):
        rt.step(np.array([1]), co)
    with pytest.raises(GptsError, match="token id 4096 is outside the vocabulary"):
        rt.step(np.array([4096]), rt.new_cache())


def test_greedy_64_tokens_identical_torch_vs_decode_graph(pair) -> None:
    rt, ref = pair
    opts = SamplingOptions(
        temperature=0.0, repetition_penalty=1.0, no_repeat_ngram_size=0, max_new_tokens=64, stop_at_eos=False
    )
    prompt = [int(t) for t in ids_of(rt, 12)]
    got = list(generate_ids(rt, prompt, opts))
    assert len(got) == 64 and got == list(generate_ids(ref, prompt, opts))


def test_decode_graph_with_wrong_io_fails_clearly(dec_folder: Path, tmp_path: Path) -> None:
    for p in dec_folder.iterdir():
        (tmp_path / p.name).write_bytes(p.read_bytes())
    # The compatible graph under the decode name: same weights, wrong inputs.
    (tmp_path / "model.decode.onnx").write_bytes((dec_folder / "model.onnx").read_bytes())
    with pytest.raises(GptsError, match=r"model\.decode\.onnx: decode graph inputs/outputs do not match"):
        OnnxRuntime(tmp_path)


def test_int4_decode_graph_meets_the_int4_text_bounds_token_by_token(tmp_path: Path) -> None:
    """The bundled model's int4 decode flavour, scored by single steps over real text (MatMulNBits'
    one-row kernel differs from the full graph's: up to 0.4 in a logit), under the int4 bounds."""
    ckpt = load_checkpoint(None)
    for name, flavour in (("model.onnx", "compatible"), ("model.decode.onnx", "decode")):
        m = build_model(ckpt.config, ckpt.weights, quantize="int4", flavour=flavour)
        (tmp_path / name).write_bytes(m.SerializeToString())
    for name in ("config.json", "tokenizer.json", "generation_config.json"):
        src = Path(ckpt.path) / name
        if src.is_file():
            (tmp_path / name).write_bytes(src.read_bytes())
    rt, ref = OnnxRuntime(tmp_path), TorchRuntime(None)
    windows = text_windows(rt.tokenizer, 384)[:4]
    stepped = text_figures(ref, rt, windows, stepped=True)
    full = text_figures(ref, rt, windows)
    kl_max, top1_min = bounds("onnx", "int4")
    # Round-to-nearest float weights here (the export's distillation would cost the suite two
    # minutes), so the export's bounds are loosened to cover RTN (0.147 KL, 74.3 % top-1, against
    # the distilled export's 0.047 and 86.5 %); the real check is that the decode flavour is no
    # worse than the full graph on the same text.
    assert stepped["positions"] == full["positions"] == 1536
    assert stepped["mean_kl"] <= min(full["mean_kl"] * 1.05, kl_max + 0.1)
    assert stepped["top1_agreement"] >= max(full["top1_agreement"] - 0.01, top1_min - 0.13)


def test_head_dim_gqa_cannot_run_gets_the_last_logits_graph_instead(tmp_path: Path) -> None:
    ckpt = peaky_checkpoint(tmp_path / "peaky8")  # head_dim 8
    lines: list[str] = []
    path = export_onnx(ckpt, tmp_path / "model.onnx", log=lines.append, decode_graph=True)
    assert not (tmp_path / "model.decode.onnx").exists() and (tmp_path / "model.last_logits.onnx").is_file()
    assert any("no decode graph: head_dim 8" in line for line in lines)
    rt = OnnxRuntime(path.parent)
    assert rt.step(np.array([1, 2]), rt.new_cache())[0].shape == (4096,)
    with pytest.raises(GptsError, match="head_dim a multiple of 16, found 8"):
        build_model(load_checkpoint(ckpt).config, load_checkpoint(ckpt).weights, flavour="decode")
