"""ONNX export: graph validity, I/O contract, determinism, parity with PyTorch, quantization, bad input.

Parity tests use a tiny seeded model whose weights are scaled up so its logits are large (std ~3,
max ~30): with the untrained init the logits are ~0.1 and a 1e-4 bound would prove little. The
quantized bounds are measured on the bundled, really trained checkpoint, since rounding error on
random weights says nothing about text.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
torch = pytest.importorskip("torch")

from gpts_edge.checkpoint import default_model_dir, save_checkpoint  # noqa: E402
from gpts_edge.config import PRESETS  # noqa: E402
from gpts_edge.errors import GptsError  # noqa: E402
from gpts_edge.export import onnx as onnx_export  # noqa: E402
from gpts_edge.export import onnx_quant  # noqa: E402
from gpts_edge.export.onnx import export_onnx  # noqa: E402
from gpts_edge.names import onnx_io_names  # noqa: E402
from gpts_edge.parity import FP32_TOL, bounds, text_figures, text_windows  # noqa: E402
from gpts_edge.runtimes.onnx import OnnxRuntime  # noqa: E402
from gpts_edge.torch_runtime import TorchRuntime  # noqa: E402


def peaky_checkpoint(out: Path, context_length: int = 384, seed: int = 0) -> Path:
    from gpts_edge.model import GPTS, state_to_weights

    cfg = PRESETS["tiny"].replace(context_length=context_length)
    w = state_to_weights(GPTS(cfg).init_weights(seed))
    for k, v in w.items():
        if "embed" in k:
            w[k] = v * 25
        elif "q_proj" in k or "k_proj" in k:
            w[k] = v * 12  # sharp attention, so masking and positions matter
        elif v.ndim == 2:
            w[k] = v * 6
    return save_checkpoint(out, cfg, w, default_model_dir() / "tokenizer.json")


def quiet(_msg: str) -> None:
    pass


@pytest.fixture(scope="session")
def peaky(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return peaky_checkpoint(tmp_path_factory.mktemp("onnx") / "peaky")


@pytest.fixture(scope="session")
def peaky_onnx(peaky: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(peaky, tmp_path_factory.mktemp("onnx") / "model.onnx", log=quiet)


@pytest.fixture(scope="session")
def runtimes(peaky: Path, peaky_onnx: Path) -> tuple[OnnxRuntime, TorchRuntime]:
    return OnnxRuntime(peaky_onnx.parent), TorchRuntime(peaky)


def text_ids(rt: OnnxRuntime, n: int) -> np.ndarray:
    return text_windows(rt.tokenizer, 64, min_positions=n).reshape(-1)[:n]


# --- graph and folder ------------------------------------------------------------------------------


def test_export_writes_self_contained_folder(peaky_onnx: Path, peaky: Path) -> None:
    folder = peaky_onnx.parent
    names = {p.name for p in folder.iterdir()}
    assert names == {
        "model.onnx",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "genai_config.json",
    }
    assert (folder / "tokenizer.json").read_bytes() == (peaky / "tokenizer.json").read_bytes()
    assert json.loads((folder / "config.json").read_text()) == json.loads((peaky / "config.json").read_text())
    genai = json.loads((folder / "genai_config.json").read_text())
    dec = genai["model"]["decoder"]
    assert genai["model"]["type"] == "decoder"
    assert dec["filename"] == "model.onnx"
    assert dec["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert dec["outputs"]["present_value_names"] == "present.%d.value"
    assert (dec["num_key_value_heads"], dec["head_size"], dec["num_hidden_layers"]) == (2, 8, 2)


def test_graph_passes_full_checker_and_strict_shape_inference(peaky_onnx: Path) -> None:
    model = onnx.load(str(peaky_onnx))
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    assert {o.domain or "" for o in model.opset_import} == {"", "com.microsoft"}
    # Lean graph: per layer about 25 nodes plus a shared mask; a traced export has hundreds.
    assert len(inferred.graph.node) <= 30 * 2 + 20


def test_graph_io_names_and_shapes_follow_the_name_table(peaky_onnx: Path) -> None:
    model = onnx.load(str(peaky_onnx))
    cfg = PRESETS["tiny"]
    want_in, want_out = onnx_io_names(cfg)
    assert [i.name for i in model.graph.input] == want_in
    assert [o.name for o in model.graph.output] == want_out

    def dims(vi):
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    io = {v.name: dims(v) for v in [*model.graph.input, *model.graph.output]}
    assert io["input_ids"] == ["batch_size", "sequence_length"]
    assert io["attention_mask"] == ["batch_size", "total_sequence_length"]
    assert io["past_key_values.1.value"] == ["batch_size", 2, "past_sequence_length", 8]
    assert io["present.0.key"] == ["batch_size", 2, "total_sequence_length", 8]
    assert io["logits"] == ["batch_size", "sequence_length", 4096]


@pytest.mark.parametrize("quantize", ["none", "int4"])
def test_export_is_byte_identical_for_the_same_checkpoint(
    peaky: Path, tmp_path: Path, quantize: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each export with its own cache, so int4 distils twice (rather than reusing the weights).
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache-a"))
    a = export_onnx(peaky, tmp_path / "a.onnx", quantize=quantize, log=quiet).read_bytes()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache-b"))
    b = export_onnx(peaky, tmp_path / "b.onnx", quantize=quantize, log=quiet).read_bytes()
    assert a == b


def test_export_logs_one_line_per_stage(peaky: Path, tmp_path: Path) -> None:
    lines: list[str] = []
    export_onnx(peaky, tmp_path / "m.onnx", log=lines.append)
    assert [line[:5] for line in lines] == ["[1/4]", "[2/4]", "[3/4]", "[4/4]"]


# --- fp32 parity (tolerance FP32_TOL = 1e-4 on logits of std ~3) ------------------------------------


def test_logits_are_large_enough_for_the_tolerance_to_mean_something(runtimes) -> None:
    rt, ref = runtimes
    logits = ref.forward_logits(text_ids(rt, 64)[None])
    assert logits.std() > 1.0 and np.abs(logits).max() > 10


def test_prefill_64_then_32_cached_steps_match_torch(runtimes) -> None:
    rt, ref = runtimes
    ids = text_ids(rt, 96)
    lo, co = rt.step(ids[:64], rt.new_cache())
    lt, ct = ref.step(ids[:64], ref.new_cache())
    worst = np.abs(lo - lt).max()
    for t in ids[64:]:
        lo, co = rt.step(np.array([t]), co)
        lt, ct = ref.step(np.array([t]), ct)
        worst = max(worst, np.abs(lo - lt).max())
    assert co.length == 96
    assert worst <= FP32_TOL


def test_full_sequence_logits_match_torch_at_every_position(runtimes) -> None:
    rt, ref = runtimes
    ids = text_ids(rt, 200)[None]
    assert np.abs(rt.forward_logits(ids) - ref.forward_logits(ids)).max() <= FP32_TOL


def test_batch_of_three_left_padded_prompts_matches_torch(runtimes) -> None:
    rt, ref = runtimes
    ids_all = text_ids(rt, 200)
    lengths, width = [40, 23, 7], 40
    ids = np.zeros((3, width), dtype=np.int64)
    mask = np.zeros((3, width), dtype=np.int64)
    for b, n in enumerate(lengths):
        ids[b, width - n :] = ids_all[b * 60 : b * 60 + n]
        mask[b, width - n :] = 1
    got, want = rt.forward_logits(ids, mask), ref.forward_logits(ids, mask)
    real = mask.astype(bool)
    assert np.abs(got - want)[real].max() <= FP32_TOL
    # Left padding must not change a prompt's logits: row 2 alone equals row 2 padded.
    alone = rt.forward_logits(ids[2:, width - 7 :])
    assert np.abs(alone[0] - got[2, width - 7 :]).max() <= FP32_TOL


def test_context_edge_positions_370_to_383_match_torch(runtimes) -> None:
    rt, ref = runtimes
    ids = text_ids(rt, 384)
    lo, co = rt.step(ids[:370], rt.new_cache())
    lt, ct = ref.step(ids[:370], ref.new_cache())
    worst = np.abs(lo - lt).max()
    for t in ids[370:]:
        lo, co = rt.step(np.array([t]), co)
        lt, ct = ref.step(np.array([t]), ct)
        worst = max(worst, np.abs(lo - lt).max())
    assert co.length == 384
    assert worst <= FP32_TOL


def test_greedy_64_tokens_identical_torch_vs_onnx(runtimes) -> None:
    from gpts_edge.generation import generate_ids
    from gpts_edge.sampling import SamplingOptions

    rt, ref = runtimes
    opts = SamplingOptions(
        temperature=0.0, repetition_penalty=1.0, no_repeat_ngram_size=0, max_new_tokens=64, stop_at_eos=False
    )
    prompt = [int(t) for t in text_ids(rt, 12)]
    got = list(generate_ids(rt, prompt, opts))
    assert len(got) == 64
    assert got == list(generate_ids(ref, prompt, opts))


def test_graph_without_xsa_matches_plain_gqa_model(tiny_checkpoint_plain: Path, tmp_path: Path) -> None:
    path = export_onnx(tiny_checkpoint_plain, tmp_path / "m.onnx", log=quiet)
    rt, ref = OnnxRuntime(path.parent), TorchRuntime(tiny_checkpoint_plain)
    ids = text_ids(rt, 60)[None]
    assert np.abs(rt.forward_logits(ids) - ref.forward_logits(ids)).max() <= FP32_TOL
    assert "Attention" in {n.op_type for n in onnx.load(str(path)).graph.node}


def test_last_logits_flavour_is_used_for_steps_and_matches_torch(peaky: Path, tmp_path: Path) -> None:
    path = export_onnx(peaky, tmp_path / "model.onnx", log=quiet, last_logits_graph=True)
    fast = onnx.load(str(tmp_path / "model.last_logits.onnx"))
    onnx.checker.check_model(fast, full_check=True)
    dims = [d.dim_param or d.dim_value for d in fast.graph.output[0].type.tensor_type.shape.dim]
    assert dims == ["batch_size", 1, 4096]
    rt, ref = OnnxRuntime(path.parent), TorchRuntime(peaky)
    assert rt.step_session is not rt.session
    ids = text_ids(rt, 80)
    lo, co = rt.step(ids[:60], rt.new_cache())
    lt, ct = ref.step(ids[:60], ref.new_cache())
    worst = np.abs(lo - lt).max()
    for t in ids[60:]:
        lo, co = rt.step(np.array([t]), co)
        lt, ct = ref.step(np.array([t]), ct)
        worst = max(worst, np.abs(lo - lt).max())
    assert worst <= FP32_TOL
    assert np.abs(rt.forward_logits(ids[None])[0, -1] - lo).max() <= FP32_TOL


# --- quantization (bundled checkpoint, real text) ------------------------------------------------


@pytest.fixture(scope="session")
def default_torch() -> TorchRuntime:
    return TorchRuntime(None)


@pytest.mark.parametrize(("quantize", "max_bytes"), [("int8", 2_000_000), ("int4", 1_200_000)])
def test_quantized_export_shrinks_and_meets_measured_bounds(
    quantize: str, max_bytes: int, default_torch: TorchRuntime, tmp_path: Path
) -> None:
    path = export_onnx(None, tmp_path / "m.onnx", quantize=quantize, log=quiet)
    assert path.stat().st_size <= max_bytes
    model = onnx.load(str(path))
    ops = {n.op_type for n in model.graph.node}
    # One packed table serves the token lookup and the lm_head (8-bit for int8); int8 keeps
    # o_proj and down_proj behind DequantizeLinear (folded to float32 at load by our runtime).
    assert {"MatMulNBits", "GatherBlockQuantized"} <= ops
    assert ("DequantizeLinear" in ops) == (quantize == "int8")
    # The tied embedding is stored once, quantized: no float initializer holds vocab x hidden values.
    big_float = [
        i.name for i in model.graph.initializer if i.data_type == 1 and np.prod(i.dims) >= 4096 * 128
    ]
    assert big_float == []
    rt = OnnxRuntime(tmp_path)
    windows = text_windows(rt.tokenizer, 384)
    figs = text_figures(default_torch, rt, windows)
    kl_max, top1_min = bounds("onnx", quantize)
    assert figs["positions"] >= 2000
    assert figs["mean_kl"] <= kl_max
    assert figs["top1_agreement"] >= top1_min


def test_blockwise_quantization_round_trips_within_half_a_step() -> None:
    w = np.random.default_rng(0).standard_normal((8, 70)).astype(np.float32)  # 70: a ragged last block
    for bits in (8, 4):
        packed, scales = onnx_quant.quantize_blockwise(w, bits, 32)
        back = onnx_quant.dequantize_blockwise(packed, scales, bits, 70)
        step = np.repeat(np.abs(scales), 32, axis=1)[:, :70]
        err = np.abs(back - w) / step
        # The block's extreme maps exactly to -2**(bits-1); only values of the other sign near
        # that magnitude are clipped at +2**(bits-1)-1, costing up to one step.
        assert err.max() <= 1.0 + 1e-5
        clipped = np.rint(w / np.repeat(scales, 32, axis=1)[:, :70]) >= 2 ** (bits - 1)
        assert np.all(err[~clipped] <= 0.5 + 1e-5)


# --- bad input: one clear GptsError, nothing written ------------------------------------------------


def test_export_from_missing_checkpoint_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(GptsError, match="no such checkpoint directory"):
        export_onnx(tmp_path / "nope", tmp_path / "m.onnx", log=quiet)
    assert list(tmp_path.iterdir()) == []


def test_export_from_corrupt_checkpoint_fails_clearly(peaky: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (bad / name).write_bytes((peaky / name).read_bytes())
    (bad / "model.safetensors").write_bytes((peaky / "model.safetensors").read_bytes()[:1000])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(GptsError, match=r"model\.safetensors: not a readable safetensors file"):
        export_onnx(bad, out / "m.onnx", log=quiet)
    assert list(out.iterdir()) == []


def test_export_into_missing_directory_fails_clearly(peaky: Path, tmp_path: Path) -> None:
    with pytest.raises(GptsError, match="output directory does not exist"):
        export_onnx(peaky, tmp_path / "missing" / "m.onnx", log=quiet)
    assert not (tmp_path / "missing").exists()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs a read-only /proc")
def test_export_into_read_only_location_fails_clearly(peaky: Path) -> None:
    # /proc refuses new files even for root, where chmod-based read-only folders would not.
    with pytest.raises(
        GptsError, match=r"^/proc: (output directory is not writable|cannot write the export)"
    ):
        export_onnx(peaky, "/proc/model.onnx", log=quiet)


def test_export_with_unknown_quantization_fails_clearly(peaky: Path, tmp_path: Path) -> None:
    with pytest.raises(GptsError, match="unknown quantization 'int3'; choose from none, int8, int4"):
        export_onnx(peaky, tmp_path / "m.onnx", quantize="int3", log=quiet)
    assert list(tmp_path.iterdir()) == []


def test_export_with_unsupported_opset_fails_clearly(peaky: Path, tmp_path: Path) -> None:
    with pytest.raises(GptsError, match=r"--opset: expected 23\.\.\d+ .*found 17"):
        export_onnx(peaky, tmp_path / "m.onnx", opset=17, log=quiet)


def test_interrupted_write_leaves_no_partial_file(peaky: Path, tmp_path: Path, monkeypatch) -> None:
    real_replace = os.replace

    def interrupt(src, dst):
        if str(dst).endswith(".onnx"):
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(onnx_export.os, "replace", interrupt)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(peaky, tmp_path / "m.onnx", log=quiet)
    assert not (tmp_path / "m.onnx").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_cli_export_unknown_format_exits_2_with_one_line(tmp_path: Path) -> None:
    from tests.conftest import run_cli

    res = run_cli("export", "--format", "tflite", "-o", str(tmp_path / "m.onnx"))
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "error: --format: unknown format 'tflite'; choose from onnx, gguf, ort, hf"
    ]
    assert list(tmp_path.iterdir()) == []


def test_cli_parity_prints_table_and_exits_1_when_a_bound_fails(peaky: Path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from gpts_edge import cli, parity

    # One real run (a full parity run costs seconds): every genuine check passes, and an impossible
    # top-1 bound (> 100%) must turn into FAIL rows (full-window and token-by-token scoring) and
    # exit code 1.
    monkeypatch.setitem(parity.BOUNDS, ("onnx", "none"), (1e-8, 1.01))
    res = CliRunner().invoke(cli.app, ["parity", "--format", "onnx", "--model", str(peaky)])
    assert res.exit_code == 1, res.output
    lines = res.output.strip().splitlines()
    failed = [line for line in lines if line.startswith("FAIL")]
    assert len(failed) == 2 and "text top-1 agreement" in failed[0] and "steps: top-1 agreement" in failed[1]
    assert any(line.startswith("ok  greedy 64 tokens identical") for line in lines)
    assert any(line.startswith("ok  context edge positions 370-383") for line in lines)


def test_exported_files_get_the_usual_permissions(peaky_onnx: Path) -> None:
    mask = os.umask(0)
    os.umask(mask)
    for p in peaky_onnx.parent.iterdir():
        assert p.stat().st_mode & 0o777 == 0o666 & ~mask, p.name


def test_cli_parity_checks_the_ort_format_file_against_torch(peaky: Path) -> None:
    from typer.testing import CliRunner

    from gpts_edge import cli

    res = CliRunner().invoke(cli.app, ["parity", "--format", "ort", "--model", str(peaky), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output[res.output.index("{") :])
    assert report["ok"] and report["format"] == "ort"
    rows = {r["check"]: r for r in report["rows"]}
    assert rows["prefill 64 + 32 cached steps max|diff|"]["ok"]
    assert float(rows["prefill 64 + 32 cached steps max|diff|"]["value"]) <= 1e-4
