"""The folder `gpts-edge export --format onnx` writes: the decode flavour beside model.onnx, its
weights stored once (the flavour reads them from model.onnx), generation that really steps with it,
and flavours left over from another export that are never stepped with.

Tiny seeded models with head_dim 16 (GroupQueryAttention's smallest) and widths that int8/int4
blocks divide, as in the real model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("torch")

from gpts_edge import load  # noqa: E402
from gpts_edge.config import PRESETS  # noqa: E402
from gpts_edge.export.onnx import MIN_SHARED_BYTES, export_onnx  # noqa: E402
from gpts_edge.generation import generate_ids, sampling_options  # noqa: E402
from gpts_edge.runtimes.onnx import OnnxDecodeCache, OnnxRuntime  # noqa: E402
from gpts_edge.torch_runtime import TorchRuntime  # noqa: E402

from .conftest import make_checkpoint, run_cli  # noqa: E402

CFG = PRESETS["tiny"].replace(hidden_size=64, head_dim=16, intermediate_size=128, context_length=96)
PROMPT = "Once upon a time there was"


def quiet(_m: str) -> None:
    pass


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("dec-ckpt")
    return make_checkpoint(root / "a", CFG, seed=3), make_checkpoint(root / "b", CFG, seed=4)


def greedy(rt, n: int = 24) -> list[int]:
    opts = sampling_options(rt.generation_config, greedy=True, max_new_tokens=n)
    return list(generate_ids(rt, rt.tokenizer.encode(PROMPT).ids, opts))


def inline_bytes(path: Path) -> int:
    m = onnx.load(str(path), load_external_data=False)
    return sum(len(t.raw_data) for t in m.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL)


@pytest.mark.parametrize("quantize", ["none", "int8", "int4"])
def test_cli_export_writes_the_decode_graph_reading_every_weight_from_model_onnx(
    ckpts: tuple[Path, Path], tmp_path: Path, quantize: str
) -> None:
    out = tmp_path / "out"
    res = run_cli("export", "--format", "onnx", "--model", ckpts[0], "--quantize", quantize, "-o", out)
    assert res.returncode == 0, res.stderr
    full, dec = out / "model.onnx", out / "model.decode.onnx"
    assert full.is_file() and dec.is_file()
    # Weights once: the flavour keeps only tensors too small to be worth a reference.
    m = onnx.load(str(dec), load_external_data=False)
    ext = [t for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert len(ext) >= 10
    assert {e.value for t in ext for e in t.external_data if e.key == "location"} == {"model.onnx"}
    small = [t for t in m.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    assert all(len(t.raw_data) < MIN_SHARED_BYTES for t in small)
    assert dec.stat().st_size < 40_000 < full.stat().st_size  # graph structure only
    # What the references read is exactly the flavour that would be written with its own copy.
    from gpts_edge.checkpoint import load_checkpoint
    from gpts_edge.export.onnx_distill import quantization_inputs
    from gpts_edge.export.onnx_graph import build_model

    ck = load_checkpoint(ckpts[0])
    # The weights the export quantizes (smoothed for int8, distilled for int4) and its Hessians.
    weights, hess, scheme = quantization_inputs(ck.config, ck.weights, ck.tokenizer, quantize, None, quiet)
    want = build_model(ck.config, weights, quantize=quantize, hessians=hess, flavour="decode", scheme=scheme)
    got = onnx.load(str(dec))  # resolves the external data from model.onnx
    assert {t.name: t.raw_data for t in got.graph.initializer} == {
        t.name: t.raw_data for t in want.graph.initializer
    }
    # The full graph is unchanged: self-contained, the same bytes as an export without the flavour.
    alone = export_onnx(ckpts[0], tmp_path / "alone", quantize=quantize, log=quiet)
    assert alone.read_bytes() == full.read_bytes()
    assert not (alone.parent / "model.decode.onnx").exists()
    # And the runtime steps with it, matching the full graph's scoring within fp32 noise.
    rt = OnnxRuntime(out)
    assert rt.step_path == dec and isinstance(rt.new_cache(), OnnxDecodeCache)
    ids = rt.tokenizer.encode(PROMPT).ids
    stepped, _ = rt.step(np.array(ids), rt.new_cache())
    scored = rt.forward_logits(np.array([ids]))[0, -1]
    tol = 1e-4 if quantize == "none" else 0.05 * float(np.abs(scored).max())
    assert float(np.abs(stepped - scored).max()) <= tol


def test_no_decode_graph_flag_writes_model_onnx_alone(ckpts: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = run_cli("export", "--format", "onnx", "--model", ckpts[0], "-o", out, "--no-decode-graph")
    assert res.returncode == 0, res.stderr
    assert not (out / "model.decode.onnx").exists()
    rt = OnnxRuntime(out)
    assert rt.step_path == out / "model.onnx" and not isinstance(rt.new_cache(), OnnxDecodeCache)


def test_load_and_generate_step_with_the_decode_graph(ckpts: tuple[Path, Path], tmp_path: Path) -> None:
    """Fails if generation ran on model.onnx: the folder's decode graph is swapped for a
    self-contained one of another checkpoint, and the generated tokens must be that checkpoint's."""
    a, b = tmp_path / "a", tmp_path / "b"
    export_onnx(ckpts[0], a, log=quiet, decode_graph=True)
    export_onnx(ckpts[1], b, log=quiet, decode_graph=True)
    tokens_a = greedy(OnnxRuntime(a))
    tokens_b = greedy(TorchRuntime(ckpts[1]))
    assert tokens_a == greedy(TorchRuntime(ckpts[0])) and tokens_a != tokens_b
    # b's decode graph with its weights inside (onnx.load resolves them), no reference to a file.
    proto = onnx.load(str(b / "model.decode.onnx"))
    del proto.metadata_props[:]
    (a / "model.decode.onnx").write_bytes(proto.SerializeToString())
    m = load(a)
    assert m.generate(PROMPT, max_new_tokens=24, greedy=True) == OnnxRuntime(b).tokenizer.decode(tokens_b)
    res = run_cli("generate", PROMPT, "--model", a, "--greedy", "--max-new-tokens", "24")
    assert res.returncode == 0, res.stderr
    assert OnnxRuntime(b).tokenizer.decode(tokens_b) in res.stdout


def test_a_decode_graph_left_from_another_export_is_not_stepped_with(
    ckpts: tuple[Path, Path], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A kill between two file writes, or a model.onnx copied over from elsewhere: the flavour's
    offsets would read another graph's bytes, so the runtime steps with model.onnx and says why."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    export_onnx(ckpts[0], a / "model.onnx", log=quiet, decode_graph=True)
    export_onnx(ckpts[1], b, log=quiet)
    shutil.copyfile(b / "model.onnx", a / "model.onnx")
    rt = OnnxRuntime(a)
    assert rt.step_path == a / "model.onnx"
    assert "model.decode.onnx: not used (it was exported with another model.onnx)" in capfd.readouterr().err
    assert greedy(rt) == greedy(TorchRuntime(ckpts[1]))
    # The file-mode re-export without the flavour removes the old one rather than leave it stale.
    export_onnx(ckpts[1], a / "model.onnx", log=quiet)
    assert not (a / "model.decode.onnx").exists()


def test_user_cache_export_shares_the_weights_too(
    ckpts: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gpts_edge.api import CACHE_FORMAT, cached_export

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = cached_export(ckpts[0])
    assert f"-v{CACHE_FORMAT}-" in path.parent.name and CACHE_FORMAT >= 4
    dec = path.with_name("model.decode.onnx")
    assert inline_bytes(dec) < 1_000 and dec.stat().st_size < 40_000
    assert OnnxRuntime(path.parent).step_path == dec


def samples_loop(path: Path, cfg, prompt: list[int], n: int) -> list[int]:
    """The Kotlin/Swift samples' GptsOrtModel loop on the decode graph, over plain onnxruntime:
    one zero buffer of the full context per past_key_values.* tensor as the empty cache, the
    present.* outputs pinned to those same tensors (Java's pinned outputs, Objective-C's
    preallocated outputs), seqlens_k / total_sequence_length per step, greedy."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert "seqlens_k" in {i.name for i in sess.get_inputs()}
    shape = (1, cfg.num_kv_heads, cfg.context_length, cfg.head_dim)
    names = [f"past_key_values.{i}.{kv}" for i in range(cfg.num_layers) for kv in ("key", "value")]
    buffers = {k: np.zeros(shape, np.float32) for k in names}  # OrtValues below borrow these
    kv = {k: ort.OrtValue.ortvalue_from_numpy(a) for k, a in buffers.items()}
    length, feed, new = 0, prompt, []
    for _ in range(n):
        total = length + len(feed)
        io = sess.io_binding()
        # Kept referenced until the run: bind_cpu_input does not copy.
        small = {
            "input_ids": np.array([feed], np.int64),
            "seqlens_k": np.array([total - 1], np.int32),
            "total_sequence_length": np.array(total, np.int32),
        }
        for k, v in small.items():
            io.bind_cpu_input(k, v)
        io.bind_output("logits")  # first: get_outputs() lists outputs in binding order
        for k, v in kv.items():
            io.bind_ortvalue_input(k, v)
            io.bind_ortvalue_output(k.replace("past_key_values", "present"), v)
        sess.run_with_iobinding(io)
        logits = io.get_outputs()[0].numpy()
        feed, length = [int(np.argmax(logits[0, -1]))], total
        new.append(feed[0])
    return new


def test_ort_export_converts_the_decode_graph_reproducibly_and_generation_uses_it(
    ckpts: tuple[Path, Path], tmp_path: Path
) -> None:
    from gpts_edge.export.ort import _fixed_layout_prefix, export_ort

    a, b = tmp_path / "a", tmp_path / "b"
    export_ort(ckpts[0], a, log=quiet)
    assert {"model.ort", "model.decode.ort"} <= {p.name for p in a.iterdir()}
    assert not list(a.glob("*.onnx"))  # the decode .onnx reads model.onnx, which stays behind
    ops = (a / "required_operators.config").read_text()
    assert "GroupQueryAttention" in ops and "Attention" in ops  # kernels of both graphs
    rt = OnnxRuntime(a)
    assert rt.step_path == a / "model.decode.ort" and isinstance(rt.new_cache(), OnnxDecodeCache)
    want = greedy(TorchRuntime(ckpts[0]))
    assert greedy(rt) == want
    ids = rt.tokenizer.encode(PROMPT).ids
    plain = sampling_options(
        {}, greedy=True, max_new_tokens=20, repetition_penalty=1.0, no_repeat_ngram_size=0
    )
    assert samples_loop(a / "model.decode.ort", rt.config, ids, 20) == list(
        generate_ids(TorchRuntime(ckpts[0]), ids, plain)
    )
    if _fixed_layout_prefix() is None:
        pytest.skip("setarch -R is unavailable here, so the converter's bytes are not reproducible")
    export_ort(ckpts[0], b, log=quiet)
    for name in ("model.ort", "model.decode.ort"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_web_server_sends_the_decode_graph_only_when_it_matches_model_onnx(
    ckpts: tuple[Path, Path], tmp_path: Path
) -> None:
    from gpts_edge.web import decode_graph_for_page

    a, b = tmp_path / "a", tmp_path / "b"
    export_onnx(ckpts[0], a, log=quiet, decode_graph=True)
    export_onnx(ckpts[1], b, log=quiet)
    assert decode_graph_for_page(a / "model.onnx") == a / "model.decode.onnx"
    assert decode_graph_for_page(b / "model.onnx") is None
    shutil.copyfile(b / "model.onnx", a / "model.onnx")  # the page would read another graph's bytes
    assert decode_graph_for_page(a / "model.onnx") is None


def test_no_decode_graph_is_refused_where_there_is_no_decode_graph(tmp_path: Path) -> None:
    res = run_cli("export", "--format", "gguf", "-o", tmp_path / "m.gguf", "--no-decode-graph")
    assert res.returncode == 2 and res.stderr.startswith("error: --no-decode-graph: only applies")
    assert not list(tmp_path.iterdir())
