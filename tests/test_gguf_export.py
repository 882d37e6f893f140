"""GGUF export, import and the numpy GGUF runtime against the PyTorch reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gpts_edge.checkpoint import load_checkpoint
from gpts_edge.errors import GptsError
from gpts_edge.names import expected_shapes, gguf_name

gguf = pytest.importorskip("gguf")

from gpts_edge.export.gguf import export_gguf, import_gguf  # noqa: E402
from gpts_edge.gguf_format import permute_qk  # noqa: E402
from gpts_edge.parity import parity_report  # noqa: E402
from gpts_edge.runtimes.gguf import GGUFRuntime  # noqa: E402


@pytest.fixture(scope="session")
def tiny_gguf(tiny_checkpoint, tmp_path_factory):
    return export_gguf(tiny_checkpoint, tmp_path_factory.mktemp("gguf") / "tiny.gguf", log=lambda m: None)


@pytest.fixture(scope="session")
def plain_llama_gguf(tiny_checkpoint_plain, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    return export_gguf(tiny_checkpoint_plain, out, arch="llama", log=lambda m: None)


def _torch_runtime(path):
    from gpts_edge.torch_runtime import TorchRuntime

    return TorchRuntime(path)


def test_every_implementation_reads_the_one_xsa_clamp():
    import re

    from gpts_edge import constants, model
    from gpts_edge.export import onnx_graph
    from gpts_edge.runtimes import gguf_model

    assert model.XSA_EPS is onnx_graph.XSA_EPS is gguf_model.XSA_EPS is constants.XSA_EPS
    # The HF remote code may not import gpts_edge, so it carries its own copy: pin it.
    remote = (Path(onnx_graph.__file__).parent / "hf_remote" / "modeling_gpts.py").read_text()
    assert float(re.search(r"^XSA_EPS = (\S+)$", remote, re.M).group(1)) == constants.XSA_EPS


def test_f32_gguf_logits_match_torch_over_prefill_and_cached_steps(tiny_checkpoint):
    report = parity_report("gguf", tiny_checkpoint, quantize="f32")
    assert report["ok"], report["rows"]
    assert report["prefill_steps_max_abs_diff"] <= 1e-4  # prefill 64 + 32 cached steps
    assert report["left_padded_batch_max_abs_diff"] <= 1e-4
    assert report["context_edge_max_abs_diff"] <= 1e-4
    assert report["text_stepped"]["positions"] >= 2000 and report["text_stepped"]["max_abs_diff"] <= 5e-4


def test_forward_logits_with_left_padding_matches_torch(tiny_checkpoint, tiny_gguf):
    ref, rt = _torch_runtime(tiny_checkpoint), GGUFRuntime(tiny_gguf)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 4096, size=(3, 12))
    mask = np.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :11] = 0
    want, got = ref.forward_logits(ids, mask), rt.forward_logits(ids, mask)
    assert got.shape == (3, 12, 4096)
    assert np.abs(got - want)[mask.astype(bool)].max() <= 1e-4
    # A left-padded row scores exactly like the same tokens alone.
    alone = rt.forward_logits(ids[1:2, 5:])
    assert np.abs(alone[0] - got[1, 5:]).max() <= 1e-5


def test_gguf_file_has_arch_keys_llama_tensor_names_and_tokenizer(tiny_checkpoint, tiny_gguf):
    reader = gguf.GGUFReader(tiny_gguf)
    fields = reader.fields
    cfg = load_checkpoint(tiny_checkpoint).config

    def value(key):
        f = fields[key]
        return f.contents()

    assert value("general.architecture") == "gpts"
    assert value("gpts.attention.exclusive") is True
    assert value("gpts.embedding_length") == cfg.hidden_size
    assert value("gpts.attention.head_count_kv") == cfg.num_kv_heads
    assert value("gpts.attention.key_length") == cfg.head_dim
    assert value("gpts.vocab_size") == cfg.vocab_size
    assert value("gpts.rope.freq_base") == pytest.approx(cfg.rope_theta)
    for key in (
        "general.name",
        "general.file_type",
        "general.quantization_version",
        "general.license",
        "gpts.context_length",
        "gpts.block_count",
        "gpts.feed_forward_length",
        "gpts.attention.head_count",
        "gpts.attention.value_length",
        "gpts.attention.layer_norm_rms_epsilon",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
    ):
        assert key in fields, key
    assert value("tokenizer.ggml.model") == "gpt2"
    assert len(value("tokenizer.ggml.tokens")) == cfg.vocab_size
    assert value("tokenizer.ggml.token_type")[0] == 3  # <|endoftext|> is a control token
    names = {t.name for t in reader.tensors}
    assert names == {gguf_name(n) for n in expected_shapes(cfg)}
    assert "blk.1.ffn_down.weight" in names and "output.weight" not in names  # tied head


def test_quantized_export_keeps_norms_f32_and_unblockable_rows_f16(tiny_checkpoint, tmp_path):
    notes = []
    path = export_gguf(tiny_checkpoint, tmp_path / "q4.gguf", quant="q4_0", log=notes.append)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    # tiny preset: intermediate 48, so ffn_down rows (48) cannot be split in 32-wide blocks.
    assert types["blk.0.ffn_down.weight"] == "F16"
    assert types["blk.0.ffn_gate.weight"] == "Q4_0"
    assert types["token_embd.weight"] == "Q4_0"
    assert types["blk.0.attn_norm.weight"] == "F32" and types["output_norm.weight"] == "F32"
    assert any("ffn_down" in n and "f16" in n for n in notes)
    sizes = {
        q: export_gguf(tiny_checkpoint, tmp_path / f"{q}.gguf", quant=q, log=lambda m: None).stat().st_size
        for q in ("f32", "f16", "q8_0")
    }
    assert sizes["f32"] > sizes["f16"] > sizes["q8_0"] > path.stat().st_size


def test_f32_import_round_trip_is_bit_exact(tiny_checkpoint, tiny_gguf, tmp_path):
    out = import_gguf(tiny_gguf, tmp_path / "back")
    a, b = load_checkpoint(tiny_checkpoint), load_checkpoint(out)
    assert a.config == b.config
    assert a.weights.keys() == b.weights.keys()
    for name, w in a.weights.items():
        assert b.weights[name].dtype == np.float32
        assert np.array_equal(w.view(np.uint32), b.weights[name].view(np.uint32)), name
    for key in ("temperature", "top_p", "top_k", "repetition_penalty", "bos_token_id", "eos_token_id"):
        assert a.generation[key] == b.generation[key], key
    from gpts_edge.tokenizer import load_tokenizer

    ta, tb = load_tokenizer(a.tokenizer_path), load_tokenizer(b.tokenizer_path)
    assert ta.get_vocab() == tb.get_vocab()
    text = "Round trip: naïve café, 東京, 🙂<|endoftext|>end"
    assert ta.encode(text).ids == tb.encode(text).ids


def test_export_refuses_llama_arch_for_xsa_checkpoint(tiny_checkpoint, tmp_path):
    with pytest.raises(GptsError, match="exclusive attention"):
        export_gguf(tiny_checkpoint, tmp_path / "x.gguf", arch="llama", log=lambda m: None)
    assert not list(tmp_path.iterdir())


def test_export_failure_leaves_existing_output_untouched(tiny_checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "model.gguf"
    out.write_bytes(b"GGUF previous")  # a (broken) earlier export: replacing it needs no --force

    def boom(self, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    # A failed write is one clear line, never a bare OSError traceback.
    with pytest.raises(GptsError, match=r": cannot write the export \(disk full\)"):
        export_gguf(tiny_checkpoint, out, log=lambda m: None)
    assert out.read_bytes() == b"GGUF previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


def _rope_ggml_interleaved(x, pos, theta):
    """GGML's normal (non-NEOX) RoPE: rotate neighbouring pairs (2i, 2i+1) by pos * theta^(-2i/D)."""
    d = x.shape[-1]
    ang = pos * theta ** (-np.arange(0, d, 2) / d)
    c, s = np.cos(ang), np.sin(ang)
    out = x.copy()
    out[..., 0::2] = x[..., 0::2] * c - x[..., 1::2] * s
    out[..., 1::2] = x[..., 0::2] * s + x[..., 1::2] * c
    return out


def _rope_hf(x, pos, theta):
    d = x.shape[-1]
    ang = pos * theta ** (-np.arange(0, d, 2) / d)
    c, s = np.cos(np.concatenate([ang, ang])), np.sin(np.concatenate([ang, ang]))
    rot = np.concatenate([-x[..., d // 2 :], x[..., : d // 2]], axis=-1)
    return x * c + rot * s


def test_llama_arch_qk_rows_follow_ggml_interleaved_rope(tiny_checkpoint_plain, plain_llama_gguf):
    ckpt = load_checkpoint(tiny_checkpoint_plain)
    cfg = ckpt.config
    tensors = {t.name: t for t in gguf.GGUFReader(plain_llama_gguf).tensors}
    rng = np.random.default_rng(1)
    x = rng.standard_normal(cfg.hidden_size)
    for proj, heads, short in (("q_proj", cfg.num_heads, "attn_q"), ("k_proj", cfg.num_kv_heads, "attn_k")):
        w_hf = ckpt.weights[f"model.layers.0.self_attn.{proj}.weight"].astype(np.float64)
        w_file = np.array(tensors[f"blk.0.{short}.weight"].data, dtype=np.float64)
        assert np.array_equal(w_file, permute_qk(w_hf, heads))
        for pos in (0, 3, 17):
            hf = _rope_hf((w_hf @ x).reshape(heads, -1), pos, cfg.rope_theta)
            gg = _rope_ggml_interleaved((w_file @ x).reshape(heads, -1), pos, cfg.rope_theta)
            # Same rotated vectors up to the row order llama.cpp uses: q.k dot products agree.
            assert np.allclose(permute_qk(hf.reshape(-1, 1), heads).ravel(), gg.ravel(), atol=1e-12)


def test_llama_arch_file_runs_like_torch_in_numpy_runtime(tiny_checkpoint_plain, plain_llama_gguf):
    rt, ref = GGUFRuntime(plain_llama_gguf), _torch_runtime(tiny_checkpoint_plain)
    assert rt.arch == "llama" and not rt.config.exclusive_attention
    ids = np.random.default_rng(2).integers(0, 4096, size=(1, 20))
    assert np.abs(rt.forward_logits(ids) - ref.forward_logits(ids)).max() <= 1e-4


def test_greedy_text_identical_gguf_vs_torch(tiny_checkpoint, tiny_gguf):
    from gpts_edge.generation import generate_text, sampling_options

    gg, ref = GGUFRuntime(tiny_gguf), _torch_runtime(tiny_checkpoint)
    opts = sampling_options(gg.generation_config, greedy=True, max_new_tokens=40)
    for prompt in ("The little robot", "Über café 東京"):
        a = "".join(generate_text(gg, prompt, opts))
        b = "".join(generate_text(ref, prompt, opts))
        assert a == b and len(a) > 0


def test_greedy_text_identical_gguf_vs_onnx(tiny_checkpoint, tiny_gguf, tmp_path, monkeypatch):
    pytest.importorskip(
        "gpts_edge.runtimes.onnx", reason="ONNX runtime module not available in this checkout"
    )
    pytest.importorskip("onnx", reason="the onnx package is needed to export the ONNX side")
    from gpts_edge.api import open_runtime
    from gpts_edge.generation import generate_text, sampling_options

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # the ONNX runtime exports into its cache
    gg, ox = GGUFRuntime(tiny_gguf), open_runtime("onnx", tiny_checkpoint)
    opts = sampling_options(gg.generation_config, greedy=True, max_new_tokens=40)
    for prompt in ("The little robot", "Über café 東京"):
        assert "".join(generate_text(gg, prompt, opts)) == "".join(generate_text(ox, prompt, opts))


@pytest.mark.slow
def test_bundled_model_gguf_parity_within_stated_bounds():
    from gpts_edge.torch_runtime import TorchRuntime

    ref = TorchRuntime(None, threads=1)
    reports = [
        parity_report("gguf", None, quantize=q, reference=ref)
        for q in ("f32", "f16", "q8_0", "q4_mix", "q4_0")
    ]
    for report in reports:
        assert report["ok"], (report["quantize"], report["rows"])
        assert report["text"]["positions"] >= 2000
        kinds = {r["check"] for r in report["rows"]}
        assert any("KL" in k for k in kinds) and any("top-1" in k for k in kinds)
    sizes = [r["model_bytes"] for r in reports]
    assert sizes == sorted(sizes, reverse=True)


def test_cli_export_then_generate_with_gguf_runtime(tiny_checkpoint, tmp_path):
    from tests.conftest import run_cli

    out = tmp_path / "m.gguf"
    r = run_cli("export", "--format", "gguf", "--model", tiny_checkpoint, "-o", out, "--quant", "q8_0")
    assert r.returncode == 0, r.stderr
    assert "stored as f16" in r.stderr and out.is_file()
    r = run_cli("generate", "Hello", "--runtime", "gguf", "--model", out, "--max-new-tokens", "5", "--greedy")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Hello")


def test_exclusive_flag_in_the_file_decides_whether_xsa_runs(tiny_checkpoint, tmp_path):
    from gpts_edge.export.gguf import plan_gguf, write_plan

    ref = _torch_runtime(tiny_checkpoint)
    ids = np.random.default_rng(4).integers(0, 4096, size=(1, 16))
    want = ref.forward_logits(ids)
    plan = plan_gguf(load_checkpoint(tiny_checkpoint))
    plan.kv = [(k, False if k == "gpts.attention.exclusive" else v, t, s) for k, v, t, s in plan.kv]
    off = GGUFRuntime(write_plan(plan, tmp_path / "no-xsa.gguf"))
    assert not off.config.exclusive_attention
    # Same weights without XSA are a different model: the flag is read and honoured, not assumed.
    assert np.abs(off.forward_logits(ids) - want).max() > 1e-3
