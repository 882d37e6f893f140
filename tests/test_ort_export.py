"""ORT-format (mobile) export: the .ort file runs in Python onnxruntime and matches PyTorch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gpts_edge.errors import GptsError

from .conftest import run_cli

onnxruntime = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from gpts_edge.export.ort import OPS_CONFIG_FILE, ORT_FILE, export_ort, required_operators  # noqa: E402

PARITY_TOL = 1e-4
PROMPT_IDS = [17, 400, 9, 1203, 77, 3050, 12, 5, 88, 2047, 640, 3]
DECODE_IDS = [101, 2999, 44, 7, 4095]


@pytest.fixture(scope="session")
def ort_folder(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ort") / "tiny-ort"
    export_ort(tiny_checkpoint, out, log=lambda _m: None)
    return out


def _session(path: Path):
    opts = onnxruntime.SessionOptions()
    opts.intra_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _run(sess, ids: list[int], past: list[np.ndarray], past_len: int, layers: int):
    feeds = {
        "input_ids": np.asarray([ids], dtype=np.int64),
        "attention_mask": np.ones((1, past_len + len(ids)), dtype=np.int64),
        "position_ids": np.arange(past_len, past_len + len(ids), dtype=np.int64)[None],
    }
    for i in range(layers):
        feeds[f"past_key_values.{i}.key"] = past[2 * i]
        feeds[f"past_key_values.{i}.value"] = past[2 * i + 1]
    names = [o.name for o in sess.get_outputs()]
    out = dict(zip(names, sess.run(None, feeds), strict=True))
    present = [out[f"present.{i}.{kv}"] for i in range(layers) for kv in ("key", "value")]
    return out["logits"][0], present


def _ort_logits(path: Path, cfg) -> list[np.ndarray]:
    """Prefill logits (T, V) and then one (1, V) row per cached decode step."""
    sess = _session(path)
    empty = np.zeros((1, cfg.num_kv_heads, 0, cfg.head_dim), dtype=np.float32)
    logits, past = _run(sess, PROMPT_IDS, [empty] * (2 * cfg.num_layers), 0, cfg.num_layers)
    rows = [logits]
    length = len(PROMPT_IDS)
    for tok in DECODE_IDS:
        logits, past = _run(sess, [tok], past, length, cfg.num_layers)
        rows.append(logits)
        length += 1
    return rows


def _torch_logits(checkpoint: Path) -> list[np.ndarray]:
    from gpts_edge.model import load_model

    model = load_model(checkpoint)
    rows = []
    with torch.no_grad():
        logits, cache = model(torch.tensor([PROMPT_IDS]))
        rows.append(logits[0].numpy())
        for tok in DECODE_IDS:
            logits, cache = model(torch.tensor([[tok]]), cache)
            rows.append(logits[0].numpy())
    return rows


def test_ort_logits_match_torch_over_prefill_and_cached_steps(
    ort_folder: Path, tiny_checkpoint: Path
) -> None:
    from gpts_edge.config import ModelConfig

    cfg = ModelConfig.load(ort_folder / "config.json")
    got = _ort_logits(ort_folder / ORT_FILE, cfg)
    want = _torch_logits(tiny_checkpoint)
    assert (
        [g.shape for g in got]
        == [w.shape for w in want]
        == [(len(PROMPT_IDS), cfg.vocab_size)] + [(1, cfg.vocab_size)] * len(DECODE_IDS)
    )
    diffs = [float(np.abs(g - w).max()) for g, w in zip(got, want, strict=True)]
    assert max(diffs) <= PARITY_TOL, f"max|diff| per call: {diffs}"
    # The comparison must be over real, varied logits (a constant graph would pass trivially).
    assert float(np.std(want[0])) > 1e-3


def test_ort_folder_is_self_contained_with_required_operators(
    ort_folder: Path, tiny_checkpoint: Path
) -> None:
    names = {p.name for p in ort_folder.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", ORT_FILE, OPS_CONFIG_FILE} <= names
    assert not names & {"model.onnx", "genai_config.json"}  # genai's config would name a missing file
    assert json.loads((ort_folder / "config.json").read_text())["num_hidden_layers"] == 2
    assert (ort_folder / "tokenizer.json").read_bytes() == (tiny_checkpoint / "tokenizer.json").read_bytes()
    # The .ort file is a FlatBuffer with onnxruntime's "ORTM" identifier at bytes 4..8.
    assert (ort_folder / ORT_FILE).read_bytes()[4:8] == b"ORTM"
    ops = required_operators(ort_folder)
    op_names = {op for _domain, _opset, op in ops}
    assert {"Attention", "RotaryEmbedding", "MatMul", "Gather"} <= op_names
    # Every listed kernel must be one the graph really uses (the reduced build depends on it).
    assert "scratch" not in (ort_folder / OPS_CONFIG_FILE).read_text()
    assert not any("tmp-" in line for line in (ort_folder / OPS_CONFIG_FILE).read_text().splitlines())


def test_ort_int8_export_matches_onnx_int8_graph(tmp_path: Path) -> None:
    """The converter must not change the quantized graph's numbers (quantized kernels survive)."""
    from gpts_edge.config import PRESETS, ModelConfig
    from gpts_edge.export.onnx import export_onnx

    from .conftest import make_checkpoint

    # Every matmul's input width is a multiple of the int8 block (64), as in the real model.
    cfg = PRESETS["tiny"].replace(hidden_size=64, head_dim=16, intermediate_size=128)
    tiny_checkpoint = make_checkpoint(tmp_path / "ckpt64", cfg, seed=2)
    export_ort(tiny_checkpoint, tmp_path / "ort8", quantize="int8", log=lambda _m: None)
    (tmp_path / "onnx8").mkdir()
    export_onnx(tiny_checkpoint, tmp_path / "onnx8" / "model.onnx", quantize="int8", log=lambda _m: None)
    cfg = ModelConfig.load(tmp_path / "ort8" / "config.json")
    got = _ort_logits(tmp_path / "ort8" / ORT_FILE, cfg)
    want = _ort_logits(tmp_path / "onnx8" / "model.onnx", cfg)
    diff = max(float(np.abs(g - w).max()) for g, w in zip(got, want, strict=True))
    assert diff <= PARITY_TOL
    # The quantized kernels (whichever the ONNX exporter picks) are listed for the reduced build.
    ops = {op for _d, _o, op in required_operators(tmp_path / "ort8")}
    assert ops & {"MatMulNBits", "DequantizeLinear", "GatherBlockQuantized", "DynamicQuantizeMatMul"}


def test_cli_export_ort_writes_folder_and_rejects_foreign_folder(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "cli-ort"
    res = run_cli("export", "--format", "ort", "--model", tiny_checkpoint, "-o", out)
    assert res.returncode == 0, res.stderr
    from gpts_edge.config import ModelConfig

    cfg = ModelConfig.load(out / "config.json")
    first = _ort_logits(out / ORT_FILE, cfg)
    # Exporting again over its own output replaces it, with the same bytes where the converter
    # runs with a fixed address layout (see export/ort.py), and the same numbers everywhere.
    before = {p.name: p.read_bytes() for p in out.glob("*.ort")}
    (out / ORT_FILE).write_bytes(b"stale")
    export_ort(tiny_checkpoint, out, log=lambda _m: None)
    again = _ort_logits(out / ORT_FILE, cfg)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    from gpts_edge.export.ort import _fixed_layout_prefix

    if _fixed_layout_prefix() is not None:
        assert before == {p.name: p.read_bytes() for p in out.glob("*.ort")}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "scratch folder left behind"

    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"\xff\xd8")
    res = run_cli("export", "--format", "ort", "--model", tiny_checkpoint, "-o", foreign)
    assert res.returncode == 2
    assert res.stderr.startswith("error: ") and "not empty" in res.stderr
    assert sorted(p.name for p in foreign.iterdir()) == ["cat.jpg"]


def test_export_ort_bad_checkpoint_leaves_nothing_behind(tmp_path: Path) -> None:
    with pytest.raises(GptsError):
        export_ort(tmp_path / "no-such-checkpoint", tmp_path / "out", log=lambda _m: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    with pytest.raises(GptsError, match="folder"):
        export_ort(None, tmp_path / "model.ort", log=lambda _m: None)


def test_greedy_tokens_identical_torch_vs_ort_runtime(ort_folder: Path, tiny_checkpoint: Path) -> None:
    """The project's torch-free runtime opens the ORT folder and decodes what PyTorch decodes."""
    from gpts_edge.generation import generate_ids, sampling_options
    from gpts_edge.runtimes.onnx import OnnxRuntime
    from gpts_edge.torch_runtime import TorchRuntime

    ort_rt = OnnxRuntime(ort_folder)
    assert ort_rt.model_path.name == ORT_FILE
    torch_rt = TorchRuntime(tiny_checkpoint)
    opts = sampling_options({}, greedy=True, max_new_tokens=40)
    prompt = ort_rt.tokenizer.encode("Once upon a time there was").ids
    got = list(generate_ids(ort_rt, prompt, opts))
    want = list(generate_ids(torch_rt, prompt, opts))
    assert got == want and len(got) >= 1
    # Sampled decoding with the shared sampler and seed is the same too.
    sampled = sampling_options({}, temperature=1.0, top_p=0.9, max_new_tokens=20)
    assert list(generate_ids(ort_rt, prompt, sampled, seed=3)) == list(
        generate_ids(torch_rt, prompt, sampled, seed=3)
    )
