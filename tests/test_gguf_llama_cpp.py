"""The plain-llama GGUF path in real llama.cpp (optional), and the GGUF runtime's torch-freedom."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("gguf")

from gpts_edge.export.gguf import export_gguf  # noqa: E402


def test_gguf_runtime_never_imports_torch(tiny_checkpoint, tmp_path):
    path = export_gguf(tiny_checkpoint, tmp_path / "m.gguf", log=lambda m: None)
    code = (
        "import sys, numpy as np\n"
        "from gpts_edge.api import open_runtime\n"
        f"rt = open_runtime('gguf', {str(path)!r})\n"
        "logits, cache = rt.step(np.array([1, 2, 3]), rt.new_cache())\n"
        "rt.forward_logits(np.array([[1, 2, 3]]))\n"
        "assert logits.shape == (4096,)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_llama_cpp_runs_plain_gqa_export_like_torch(tiny_checkpoint_plain, tmp_path):
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (optional; pip install llama-cpp-python)"
    )
    import torch

    from gpts_edge.torch_runtime import TorchRuntime

    path = export_gguf(tiny_checkpoint_plain, tmp_path / "plain.gguf", arch="llama", log=lambda m: None)
    ids = [int(i) for i in np.random.default_rng(3).integers(1, 4096, size=24)]
    ref = TorchRuntime(tiny_checkpoint_plain)
    with torch.inference_mode():
        want = ref.forward_logits(np.array([ids]))[0]
    f32 = 0  # GGML_TYPE_F32: an f32 KV cache, so the cache adds no rounding of its own
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=64,
        n_batch=64,
        logits_all=True,
        type_k=f32,
        type_v=f32,
        n_threads=2,
        verbose=False,
    )
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)], dtype=np.float32)
    assert np.abs(got - want).max() <= 1e-3
