"""The int4 scheme (export/onnx_quant.py) and the GGUF q4_mix file: zero points, 8-bit groups,
GPTQ act-order, the shipped calibration text, and that onnxruntime and the GGUF runtime read
what the exporters write. The bundled model's int4 bounds are checked in test_onnx_export.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gpts_edge.export import onnx_quant
from gpts_edge.export.onnx_quant import DEFAULT_INT4, PLAIN_INT4, gptq_weight, quantize_weight

onnx = pytest.importorskip("onnx")


def test_asymmetric_blocks_round_trip_within_half_a_step_with_a_ragged_last_block() -> None:
    # Shifted weights: a symmetric grid would spend half its levels on values that never occur.
    w = (np.random.default_rng(0).standard_normal((8, 70)) + 1.5).astype(np.float32)
    for bits in (8, 4):
        qw = quantize_weight(w, bits, 32, asymmetric=True)
        assert qw.zero_points is not None and qw.zero_points.shape == (8, 3)
        back = qw.dequantize(70)
        step = np.repeat(qw.scales, 32, axis=1)[:, :70]
        assert np.all(np.abs(back - w) <= 0.5 * step + 1e-5)
        sym = quantize_weight(w, bits, 32).dequantize(70)
        assert np.abs(back - w).mean() < np.abs(sym - w).mean()


def test_gptq_act_order_and_scale_refit_lower_the_layer_output_error_of_round_to_nearest() -> None:
    rng = np.random.default_rng(1)
    w = rng.standard_normal((48, 96)).astype(np.float32)
    # Inputs with correlated columns of very different scales, as real activations have.
    x = rng.standard_normal((2048, 96)) @ rng.standard_normal((96, 96)) * rng.uniform(0.1, 3, 96)
    h = x.T @ x

    def out_err(qw: onnx_quant.QWeight) -> float:
        return float(np.linalg.norm(x @ (qw.dequantize(96) - w).T))

    rtn = out_err(quantize_weight(w, 4, 32, asymmetric=True))
    plain = out_err(gptq_weight(w, h, 4, 32, asymmetric=True))
    ordered = out_err(gptq_weight(w, h, 4, 32, asymmetric=True, act_order=True))
    assert plain < 0.8 * rtn
    assert ordered < rtn
    # Re-solving the block scales with the codes fixed can only lower the (damped) output error.
    refit = out_err(gptq_weight(w, h, 4, 32, asymmetric=True, act_order=True, refit=True))
    assert refit <= ordered * 1.001
    # act-order keeps plain contiguous blocks: every value stays on its own block's grid.
    qw = gptq_weight(w, h, 4, 32, asymmetric=True, act_order=True)
    assert qw.packed.shape == (48, 3, 16) and qw.scales.shape == (48, 3)


def test_scheme_puts_the_tied_table_and_first_mlp_at_8_bits_and_the_rest_at_4() -> None:
    s = DEFAULT_INT4
    assert (s.bits_for("embed"), s.block_for("embed")) == (8, 128)
    assert (s.bits_for("layers.0/mlp/gate_up_proj"), s.block_for("layers.0/mlp/gate_up_proj")) == (8, 128)
    for name in ("layers.0/attn/qkv_proj", "layers.1/mlp/gate_up_proj", "layers.4/mlp/down_proj"):
        assert (s.bits_for(name), s.block_for(name)) == (4, 32)
    # A kind without a layer matches that group in every layer.
    every_o = s.with_(int8=("o_proj",))
    assert {every_o.bits_for(f"layers.{i}/attn/o_proj") for i in range(5)} == {8}
    assert every_o.bits_for("embed") == 4
    assert {PLAIN_INT4.bits_for(n) for n in ("embed", "layers.0/mlp/gate_up_proj")} == {4}


def _run_op(node: object, inits: list[object], inputs: list[object], feeds: dict) -> np.ndarray:
    import onnxruntime as ort

    h = onnx.helper
    graph = h.make_graph(
        [node], "t", inputs, [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], inits
    )
    model = h.make_model(
        graph, opset_imports=[h.make_opsetid("", 21), h.make_opsetid("com.microsoft", 1)], ir_version=10
    )
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


@pytest.mark.parametrize("bits", [4, 8])
def test_onnxruntime_reads_zero_points_as_numpy_dequantizes(bits: int) -> None:
    """MatMulNBits (accuracy_level 0) and GatherBlockQuantized with our packed zero points give
    the numpy dequantization: the byte layout of the stored weights is what onnxruntime reads."""
    from onnx import numpy_helper as nh

    h = onnx.helper
    rng = np.random.default_rng(2)
    n, k, block = 40, 96, 32  # 3 blocks: an odd count, so 4-bit zero points need padding
    w = (rng.standard_normal((n, k)) + 0.7).astype(np.float32)
    qw = quantize_weight(w, bits, block, asymmetric=True)
    x = rng.standard_normal((5, k)).astype(np.float32)
    zp = qw.packed_zero_points()
    inits = [
        nh.from_array(qw.packed, "q"),
        nh.from_array(qw.scales.reshape(-1), "s"),
        nh.from_array(zp.reshape(-1), "z"),
    ]
    node = h.make_node(
        "MatMulNBits",
        ["x", "q", "s", "z"],
        ["y"],
        domain="com.microsoft",
        K=k,
        N=n,
        bits=bits,
        block_size=block,
        accuracy_level=0,
    )
    x_info = h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [5, k])
    got = _run_op(node, inits, [x_info], {"x": x})
    np.testing.assert_allclose(got, x @ qw.dequantize(k).T, rtol=1e-4, atol=1e-4)

    rows = nh.from_array(qw.packed.reshape(n, -1), "q")
    inits = [rows, nh.from_array(qw.scales, "s"), nh.from_array(zp, "z")]
    node = h.make_node(
        "GatherBlockQuantized",
        ["q", "ids", "s", "z"],
        ["y"],
        domain="com.microsoft",
        block_size=block,
        bits=bits,
        gather_axis=0,
        quantize_axis=1,
    )
    ids_info = h.make_tensor_value_info("ids", onnx.TensorProto.INT64, [3])
    ids = np.array([0, 17, 39], dtype=np.int64)
    got = _run_op(node, inits, [ids_info], {"ids": ids})
    np.testing.assert_allclose(got, qw.dequantize(k)[ids], rtol=1e-6, atol=1e-6)


def test_calibration_text_ships_in_the_package_and_is_not_the_parity_text() -> None:
    from gpts_edge.checkpoint import load_checkpoint
    from gpts_edge.export.onnx_calibration import CALIBRATION_TEXT, text_ids
    from gpts_edge.parity import PARITY_TEXT

    assert CALIBRATION_TEXT.parent == PARITY_TEXT.parent and CALIBRATION_TEXT.suffix == ".txt"  # data/*.txt
    windows = text_ids(load_checkpoint(None).tokenizer, 256)
    assert windows.shape[0] >= 128 and windows.shape[1] == 256
    calib = CALIBRATION_TEXT.read_text(encoding="utf-8")
    parity_lines = [s for s in PARITY_TEXT.read_text(encoding="utf-8").split(". ") if len(s) > 40]
    assert not any(s in calib for s in parity_lines)


# --- GGUF q4_mix -------------------------------------------------------------------------------


def test_gguf_q4_mix_keeps_embedding_k_v_at_q8_0_and_both_arches_read_it(
    tiny_checkpoint: Path, tiny_checkpoint_plain: Path, tmp_path: Path
) -> None:
    gguf = pytest.importorskip("gguf")
    from gpts_edge.export.gguf import export_gguf
    from gpts_edge.runtimes.gguf import GGUFRuntime

    quiet = lambda _m: None  # noqa: E731
    for ckpt, arch in ((tiny_checkpoint, "gpts"), (tiny_checkpoint_plain, "llama")):
        mix = export_gguf(ckpt, tmp_path / f"{arch}-mix.gguf", quant="q4_mix", arch=arch, log=quiet)
        q4 = export_gguf(ckpt, tmp_path / f"{arch}-q4.gguf", quant="q4_0", arch=arch, log=quiet)
        f32 = export_gguf(ckpt, tmp_path / f"{arch}-f32.gguf", arch=arch, log=quiet)
        types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(mix).tensors}
        assert (
            types["token_embd.weight"]
            == types["blk.0.attn_v.weight"]
            == types["blk.1.attn_k.weight"]
            == "Q8_0"
        )
        assert types["blk.0.attn_q.weight"] == types["blk.0.ffn_gate.weight"] == "Q4_0"
        assert q4.stat().st_size < mix.stat().st_size < f32.stat().st_size
        rt_mix, rt_q4, rt_f32 = GGUFRuntime(mix), GGUFRuntime(q4), GGUFRuntime(f32)
        assert rt_mix.tensor_types == types
        ids = np.arange(1, 49, dtype=np.int64).reshape(2, 24) * 37 % rt_f32.config.vocab_size
        ref = rt_f32.forward_logits(ids)
        err_mix = np.abs(rt_mix.forward_logits(ids) - ref).mean()
        err_q4 = np.abs(rt_q4.forward_logits(ids) - ref).mean()
        assert np.isfinite(err_mix) and err_mix < err_q4
