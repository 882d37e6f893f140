"""The transformers.js layout loads in @huggingface/transformers under Node (onnxruntime-node,
CPU) and generates our greedy tokens, for every shipped dtype.

The npm packages live in tests/js/transformersjs (package-lock.json pins them); install with
``npm ci --ignore-scripts --prefix tests/js/transformersjs``. Uses the bundled trained model so
argmax margins are wide (see test_compat_genai.py).
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpts_edge.config import ModelConfig
from gpts_edge.errors import GptsError
from gpts_edge.export.compat import export_transformersjs, parse_quantizations
from gpts_edge.generation import generate_ids, sampling_options
from gpts_edge.runtimes.onnx import OnnxRuntime
from tests.conftest import run_cli

JS_DIR = Path(__file__).resolve().parent / "js" / "transformersjs"
PROMPT = "Once upon a time"
MAX_NEW = 40
# transformers.js dtype -> our quantization and the file it must load.
DTYPES = {
    "fp32": ("none", "model.onnx"),
    "q8": ("int8", "model_quantized.onnx"),
    "q4": ("int4", "model_q4.onnx"),
}


def _node_or_skip() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not on PATH (transformers.js runs under Node)")
    if not (JS_DIR / "node_modules" / "@huggingface" / "transformers" / "package.json").is_file():
        pytest.skip(f"@huggingface/transformers not installed: npm ci --ignore-scripts --prefix {JS_DIR}")
    # The package ships prebuilt binaries; its install script (skipped) would only fetch extras.
    os_name = {"linux": "linux", "darwin": "darwin", "win32": "win32"}.get(sys.platform, sys.platform)
    arch = {"x86_64": "x64", "AMD64": "x64", "aarch64": "arm64", "arm64": "arm64"}.get(
        platform.machine(), platform.machine()
    )
    binding = list(
        (JS_DIR / "node_modules" / "onnxruntime-node" / "bin").glob(f"napi-v*/{os_name}/{arch}/*.node")
    )
    if not binding:
        pytest.skip(f"onnxruntime-node ships no binary for {os_name}/{arch}")
    return node


def transformersjs(node: str, folder: Path, dtype: str, penalties: bool) -> dict:
    cmd = [node, "greedy.mjs", str(folder), dtype, str(MAX_NEW), "config" if penalties else "off", PROMPT]
    proc = subprocess.run(cmd, cwd=JS_DIR, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ours(model_file: Path, prompt_ids: list[int], penalties: bool) -> list[int]:
    rt = OnnxRuntime(model_file)
    extra = {} if penalties else {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0}
    opts = sampling_options(rt.generation_config, greedy=True, max_new_tokens=MAX_NEW, **extra)
    return list(generate_ids(rt, prompt_ids, opts))


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_transformersjs(
        None, tmp_path_factory.mktemp("tjs") / "gpts-tjs", quantize="all", log=lambda _m: None
    )


# --- folder (no Node needed) ----------------------------------------------------------------------


def test_layout_has_the_files_transformersjs_and_our_runtime_read(layout: Path) -> None:
    top = {p.name for p in layout.iterdir()}
    assert top == {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "onnx"}
    sub = {p.name for p in (layout / "onnx").iterdir()}
    assert {"model.onnx", "model_quantized.onnx", "model_q4.onnx", "genai_config.json", "config.json"} <= sub
    cfg = json.loads((layout / "config.json").read_text())
    assert (cfg["model_type"], cfg["architectures"]) == ("llama", ["LlamaForCausalLM"])
    assert cfg["transformers.js_config"] == {"dtype": "fp32"}
    # transformers.js sizes the empty KV cache from these; they must describe the graph.
    gpts = ModelConfig.load(layout / "onnx" / "config.json")
    assert (cfg["num_key_value_heads"], cfg["head_dim"], cfg["num_hidden_layers"]) == (
        gpts.num_kv_heads,
        gpts.head_dim,
        gpts.num_layers,
    )
    gen = json.loads((layout / "generation_config.json").read_text())
    assert gen["top_k"] == 0  # transformers.js would otherwise default to top_k=50
    with pytest.raises(GptsError, match="model_type"):
        ModelConfig.load(layout / "config.json")


def test_bad_quantize_list_and_foreign_output_folder_are_refused(tmp_path: Path) -> None:
    with pytest.raises(GptsError, match="--quantize"):
        parse_quantizations("none,int3")
    assert parse_quantizations("int4,none") == ["none", "int4"]
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"x")
    with pytest.raises(GptsError, match="refusing to replace"):
        export_transformersjs(None, foreign, log=lambda _m: None)
    assert (foreign / "cat.jpg").read_bytes() == b"x"


def test_cli_export_layout_transformersjs_single_variant(tmp_path: Path) -> None:
    out = tmp_path / "q4only"
    # int4 distils before rounding (about 190 s on a quiet 2-core machine unless another test has
    # already cached the distilled weights), beyond the default 120 s subprocess limit.
    proc = run_cli(
        "export",
        "--format",
        "onnx",
        "--layout",
        "transformersjs",
        "--quantize",
        "int4",
        "-o",
        out,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (out / "onnx").glob("*.onnx")) == ["model_q4.onnx"]
    assert json.loads((out / "config.json").read_text())["transformers.js_config"] == {"dtype": "q4"}
    bad = run_cli("export", "--format", "gguf", "--layout", "transformersjs", "-o", tmp_path / "x.gguf")
    assert bad.returncode == 2 and bad.stderr.startswith("error: --layout")


# --- under Node -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_greedy_tokens_identical_ours_vs_transformersjs(layout: Path, dtype: str) -> None:
    node = _node_or_skip()
    got = transformersjs(node, layout, dtype, penalties=False)
    rt = OnnxRuntime(layout / "onnx" / DTYPES[dtype][1])
    assert got["prompt_ids"] == rt.tokenizer.encode(PROMPT).ids
    expected = ours(layout / "onnx" / DTYPES[dtype][1], got["prompt_ids"], penalties=False)
    assert len(expected) == MAX_NEW
    assert got["new_ids"] == expected
    # pipeline('text-generation') runs the same generate; its text is our decoded tokens.
    assert got["pipeline_text"] == rt.tokenizer.decode(expected)


def test_greedy_with_config_penalties_identical_ours_vs_transformersjs(layout: Path) -> None:
    """generation_config.json's repetition_penalty 1.1 / no_repeat_ngram_size 4 act the same."""
    node = _node_or_skip()
    got = transformersjs(node, layout, "fp32", penalties=True)
    expected = ours(layout / "onnx" / "model.onnx", got["prompt_ids"], penalties=True)
    assert got["new_ids"] == expected
    assert expected != ours(layout / "onnx" / "model.onnx", got["prompt_ids"], penalties=False)


def test_transformersjs_default_dtype_comes_from_config(tmp_path: Path) -> None:
    """With only the int4 file exported, plain from_pretrained (no dtype) must find it."""
    node = _node_or_skip()
    out = export_transformersjs(None, tmp_path / "q4", quantize="int4", log=lambda _m: None)
    got = transformersjs(node, out, "default", penalties=False)
    q4 = ours(out / "onnx" / "model_q4.onnx", got["prompt_ids"], penalties=False)
    assert got["new_ids"] == q4


def test_each_dtype_file_computes_different_logits(layout: Path) -> None:
    """The three files really are three models: their next-token logits differ. (Their greedy
    tokens can coincide: int8 agrees with fp32 on whole 40-token greedy runs of several prompts.)"""
    rt = OnnxRuntime(layout / "onnx")
    ids = np.asarray(rt.tokenizer.encode(PROMPT).ids, dtype=np.int64)
    runtimes = {d: OnnxRuntime(layout / "onnx" / f) for d, (_q, f) in DTYPES.items()}
    logits = {d: r.step(ids, r.new_cache())[0] for d, r in runtimes.items()}
    names = list(DTYPES)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert np.abs(logits[a] - logits[b]).max() > 1e-3, (a, b)
