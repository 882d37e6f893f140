"""Quantization-aware distillation (export/onnx_distill.py) and SmoothQuant scaling
(onnx_quant.smooth_weights): the student sees exactly what the export stores, distillation lowers
the rounded model's KL, the exported file computes the trained student, and smoothing keeps the
float model's function. Tiny models and random tokens only (no network, no shared data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gpts_edge.export.onnx_quant import DEFAULT_INT4, quantize_weight, smooth_weights

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from gpts_edge.export.onnx_distill import (  # noqa: E402
    DistillConfig,
    clip_weight,
    distill_weights,
    fake_quantize,
    graph_name,
)


def _logits(cfg, weights: dict[str, np.ndarray], ids: np.ndarray) -> np.ndarray:
    from gpts_edge.model import GPTS, weights_to_state

    m = GPTS(cfg)
    m.load_state_dict(weights_to_state(weights))
    with torch.no_grad():
        return m.eval()(torch.as_tensor(ids))[0].numpy()


def _kl(a: np.ndarray, b: np.ndarray) -> float:
    la = a - a.max(-1, keepdims=True)
    la -= np.log(np.exp(la).sum(-1, keepdims=True))
    lb = b - b.max(-1, keepdims=True)
    lb -= np.log(np.exp(lb).sum(-1, keepdims=True))
    return float((np.exp(la) * (la - lb)).sum(-1).mean())


def _rounded(weights: dict[str, np.ndarray], scheme) -> dict[str, np.ndarray]:
    """Each quantized weight replaced by what round-to-nearest under ``scheme`` stores."""
    out = dict(weights)
    for name, w in weights.items():
        group = graph_name(name.removeprefix("model."))
        if group is not None:
            out[name] = scheme.quantize(w, group).dequantize(w.shape[1])
    return out


@pytest.mark.parametrize(("bits", "asymmetric"), [(4, True), (4, False), (8, True), (8, False)])
def test_fake_quantization_is_code_for_code_what_the_exporter_stores(bits: int, asymmetric: bool) -> None:
    w = (np.random.default_rng(bits).standard_normal((12, 70)) * 0.05 + 0.01).astype(np.float32)
    stored = quantize_weight(w, bits, 32, asymmetric=asymmetric).dequantize(70)
    t = torch.tensor(w, requires_grad=True)
    fq = fake_quantize(t, bits, 32, asymmetric)
    assert np.array_equal(fq.detach().numpy(), stored)
    # Straight-through: the rounding passes the gradient unchanged.
    fq.sum().backward()
    assert torch.equal(t.grad, torch.ones_like(t))


@pytest.mark.parametrize("bits", [4, 8])
def test_learned_clipping_stores_what_the_student_saw_once_the_weights_are_clamped(bits: int) -> None:
    rng = np.random.default_rng(10 + bits)
    w = (rng.standard_normal((12, 70)) * 0.05 + 0.01).astype(np.float32)
    logits = torch.tensor(rng.uniform(-1.0, 6.0, (2, 12, 3)), dtype=torch.float32, requires_grad=True)
    clip = (logits[0].sigmoid(), logits[1].sigmoid())  # factors 0.27 to 0.998
    t = torch.tensor(w, requires_grad=True)
    fq = fake_quantize(t, bits, 32, True, clip)
    clamped = clip_weight(torch.tensor(w), 32, (clip[0].detach(), clip[1].detach())).numpy()
    assert not np.array_equal(clamped, w)  # some weights were outside their block's range
    stored = quantize_weight(clamped, bits, 32, asymmetric=True).dequantize(70)
    assert np.array_equal(fq.detach().numpy(), stored)  # code for code, after the plain rule
    ((fq - t.detach()) ** 2).sum().backward()
    assert float(logits.grad.abs().min()) > 0  # every factor learns from its block's error
    with pytest.raises(ValueError, match="asymmetric"):
        fake_quantize(t, bits, 32, False, clip)


def test_every_checkpoint_weight_maps_to_its_graph_group_or_stays_float() -> None:
    assert graph_name("embed_tokens.weight") == "embed"
    assert graph_name("layers.3.self_attn.k_proj.weight") == "layers.3/attn/qkv_proj"
    assert graph_name("layers.0.mlp.up_proj.weight") == "layers.0/mlp/gate_up_proj"
    assert graph_name("layers.0.mlp.down_proj.weight") == "layers.0/mlp/down_proj"
    assert graph_name("layers.1.input_layernorm.weight") is None
    assert graph_name("norm.weight") is None


def test_distillation_lowers_the_kl_of_the_rounded_model(tiny_checkpoint: Path) -> None:
    from gpts_edge.checkpoint import load_checkpoint

    ck = load_checkpoint(tiny_checkpoint)
    cfg = ck.config
    # Larger weights than the random init's, so the float model's distributions are peaked and
    # rounding costs a measurable KL (a fresh init predicts nearly uniformly).
    weights = {
        k: v * (8 if "embed" in k else 6 if k.endswith("_proj.weight") else 1) for k, v in ck.weights.items()
    }
    ids = np.random.default_rng(0).integers(0, 300, size=(16, 32))
    scheme = DEFAULT_INT4.with_(gptq=False, int8=())
    ref = _logits(cfg, weights, ids[:4])
    before = _kl(ref, _logits(cfg, _rounded(weights, scheme), ids[:4]))
    tuned = distill_weights(cfg, weights, None, scheme, DistillConfig(steps=40, batch=8, lr=3e-4), ids=ids)
    assert set(tuned) == set(weights)
    assert all(tuned[k].shape == weights[k].shape and tuned[k].dtype == np.float32 for k in tuned)
    # On the text it trained on (a tiny model on random tokens has nothing to generalise from).
    after = _kl(ref, _logits(cfg, _rounded(tuned, scheme), ids[:4]))
    assert after < 0.7 * before, (before, after)


@pytest.mark.parametrize("clip_lr", [0.0, 0.05], ids=["min-max", "learned-clipping"])
def test_the_exported_int4_graph_computes_the_distilled_student(
    tiny_checkpoint: Path, tmp_path: Path, clip_lr: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gpts_edge.export.onnx_distill as distill
    from gpts_edge.api import open_runtime
    from gpts_edge.checkpoint import load_checkpoint
    from gpts_edge.export.onnx import export_onnx

    # float32 activations in MatMulNBits, so the only difference left is summation order.
    scheme = DEFAULT_INT4.with_(
        gptq=False, refit=False, distill_steps=5, distill_lr=1e-3, distill_clip_lr=clip_lr, accuracy_level=0
    )
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # distil here, not reuse
    seen: dict[str, dict[str, np.ndarray]] = {}
    real = distill.distill_weights

    def keep(*args, **kwargs):
        seen["w"] = real(*args, **kwargs)
        return seen["w"]

    distill.distill_weights = keep
    try:
        export_onnx(tiny_checkpoint, tmp_path / "out", quantize="int4", scheme=scheme, log=lambda m: None)
    finally:
        distill.distill_weights = real
    ck = load_checkpoint(tiny_checkpoint)
    moved = max(float(np.abs(seen["w"][k] - ck.weights[k]).max()) for k in ck.weights)
    assert moved > 0  # the run changed the weights
    ids = np.random.default_rng(1).integers(0, 4096, size=(2, 24))
    want = _logits(ck.config, _rounded(seen["w"], scheme), ids)
    got = open_runtime("onnx", tmp_path / "out").forward_logits(ids)
    assert np.abs(got - want).max() < 1e-4


def test_a_second_int4_export_reuses_the_distilled_weights(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gpts_edge.export.onnx import export_onnx

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    scheme = DEFAULT_INT4.with_(distill_steps=4, distill_clip_lr=0.05)

    def export(name: str, scheme=scheme) -> tuple[bytes, str]:
        lines: list[str] = []
        path = export_onnx(tiny_checkpoint, tmp_path / name, quantize="int4", scheme=scheme, log=lines.append)
        return path.read_bytes(), " ".join(lines)

    first, log1 = export("a")
    again, log2 = export("b")
    assert "distilling int4 (4 steps" in log1 and "reused" not in log1
    assert "distilled int4 weights reused from" in log2 and "distilling" not in log2
    assert again == first
    # A damaged entry is distilled again (to the same bytes) and replaced.
    (entry,) = (tmp_path / "cache" / "gpts-edge" / "distilled").iterdir()
    entry.write_bytes(b"not safetensors")
    redone, log3 = export("c")
    assert "distilling" in log3 and redone == first
    assert export("d")[1].count("reused") == 1
    # A scheme that stores or runs the result differently reuses it; anything the result depends
    # on is in the key: another seed or block size distils anew.
    assert "reused" in export("f", scheme.with_(accuracy_level=0))[1]
    assert "distilling" in export("e", scheme.with_(distill_seed=1))[1]
    assert "distilling" in export("g", scheme.with_(block=16))[1]


def test_smoothing_keeps_the_float_model_and_flattens_the_activation_scales(tiny_checkpoint: Path) -> None:
    from gpts_edge.checkpoint import load_checkpoint
    from gpts_edge.export.onnx_calibration import calibration_hessians

    ck = load_checkpoint(tiny_checkpoint)
    cfg = ck.config
    weights = dict(ck.weights)
    # An outlier channel, as trained RMSNorm weights have.
    g = weights["model.layers.1.input_layernorm.weight"].copy()
    g[5] = 20.0
    weights["model.layers.1.input_layernorm.weight"] = g
    ids = np.random.default_rng(2).integers(0, 4096, size=(4, 32))
    hessians = calibration_hessians(cfg, weights, ids=ids)
    smoothed, h2 = smooth_weights(cfg.num_layers, weights, hessians, 0.5)
    assert np.abs(_logits(cfg, smoothed, ids) - _logits(cfg, weights, ids)).max() < 1e-4
    # The recorded Hessians are those of the scaled inputs.
    again = calibration_hessians(cfg, smoothed, ids=ids)
    for name, h in h2.items():
        assert np.allclose(h, again[name], rtol=1e-3, atol=1e-6 * np.abs(h).max()), name
    spread = lambda h: np.sqrt(np.diag(h)).max() / np.sqrt(np.diag(h)).mean()  # noqa: E731
    assert spread(h2["layers.1/attn/qkv_proj"]) < 0.5 * spread(hessians["layers.1/attn/qkv_proj"])


def test_without_torch_int4_falls_back_to_gptq_and_says_so(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gpts_edge.export.onnx_distill as distill
    from gpts_edge.export.onnx import export_onnx
    from gpts_edge.export.onnx_quant import GPTQ_INT4

    def no_training(*args, **kwargs):
        raise AssertionError("distillation ran without torch")

    monkeypatch.setattr(distill, "_has_torch", lambda: False)
    monkeypatch.setattr(distill, "distill_weights", no_training)
    lines: list[str] = []
    a = export_onnx(tiny_checkpoint, tmp_path / "a.onnx", quantize="int4", log=lines.append)
    assert any("torch is not installed" in line and "GPTQ" in line for line in lines)
    b = export_onnx(tiny_checkpoint, tmp_path / "b.onnx", quantize="int4", scheme=GPTQ_INT4, log=quiet)
    assert a.read_bytes() == b.read_bytes()


def quiet(_m: str) -> None:
    pass
