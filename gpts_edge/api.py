"""Entry points for applications: pick a runtime by name, or ``load`` an exported folder."""

from __future__ import annotations

from pathlib import Path

from gpts_edge.errors import GptsError
from gpts_edge.generation import Runtime

RUNTIMES = ("torch", "onnx", "gguf")


def open_runtime(name: str, model: str | Path | None = None, **kwargs) -> Runtime:
    if name == "torch":
        from gpts_edge.torch_runtime import TorchRuntime

        return TorchRuntime(model, **kwargs)
    if name == "onnx":
        from gpts_edge.runtimes.onnx import open_onnx_runtime

        return open_onnx_runtime(model, **kwargs)
    if name == "gguf":
        from gpts_edge.runtimes.gguf import GGUFRuntime

        if model is None:
            raise GptsError("--runtime gguf needs --model FILE.gguf")
        return GGUFRuntime(model, **kwargs)
    raise GptsError(f"--runtime: unknown runtime {name!r}; choose from {', '.join(RUNTIMES)}")
