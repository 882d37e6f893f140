"""The one table of export formats, read by `export`, `import`, `parity` and bench.

Each format names the quantizations it accepts (one flag, ``--quantize``, for all of them), how
to export to it, how to import it back (where that exists) and which runtime opens the result.
Exporters are imported lazily: the table itself costs nothing and needs neither onnx nor torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpts_edge.errors import GptsError

Log = Callable[[str], None]


@dataclass(frozen=True)
class Format:
    name: str
    quantizations: tuple[str, ...]  # the first is the default
    runtime: str | None  # the runtime that opens an export of this format (None: not ours)
    importable: bool
    help: str

    @property
    def default_quantize(self) -> str:
        return self.quantizations[0]

    def check_quantize(self, quantize: str | None) -> str:
        q = self.default_quantize if quantize is None else quantize
        # "none" and "f32" both mean full precision; accept either for every format.
        if q in ("none", "f32") and self.default_quantize in ("none", "f32"):
            return self.default_quantize
        if q not in self.quantizations:
            raise GptsError(f"--quantize: {self.name} accepts {', '.join(self.quantizations)}, found {q!r}")
        return q

    def export(
        self,
        model: str | Path | None,
        output: str | Path,
        *,
        quantize: str | None = None,
        log: Log,
        **extra: Any,
    ) -> Path:
        """Export ``model`` (None: the bundled checkpoint) to ``output``; returns the main file."""
        q = self.check_quantize(quantize)
        if self.name == "onnx":
            from gpts_edge.export.onnx import export_onnx

            return export_onnx(model, output, quantize=q, log=log, **extra)
        if self.name == "ort":
            from gpts_edge.export.ort import export_ort

            return export_ort(model, output, quantize=q, log=log, **extra)
        if self.name == "gguf":
            from gpts_edge.export.gguf import export_gguf

            return export_gguf(model, output, quant=q, log=log, **extra)
        if self.name == "hf":
            from gpts_edge.export.hf import export_hf

            return export_hf(model, output, log=log, **extra)
        raise AssertionError(self.name)

    def import_(self, source: str | Path, output: str | Path, *, force: bool = False) -> Path:
        """Read an export back into a checkpoint directory (overwrite rules: gpts_edge.outputs)."""
        if self.name == "gguf":
            from gpts_edge.export.gguf import import_gguf

            return import_gguf(source, output, force=force)
        if self.name == "hf":
            from gpts_edge.export.hf import import_hf

            return import_hf(source, output, force=force)
        importable = ", ".join(f.name for f in FORMATS.values() if f.importable)
        raise GptsError(f"--format {self.name}: cannot be imported; importable formats: {importable}")


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format(
            "onnx", ("none", "int8", "int4"), "onnx", False, "ONNX graph with KV cache (+ decode flavour)"
        ),
        Format(
            "gguf",
            ("f32", "f16", "q8_0", "q4_0", "q4_mix"),
            "gguf",
            True,
            "GGUF file (llama.cpp tensor names)",
        ),
        Format(
            "ort", ("none", "int8", "int4"), "onnx", False, "ORT-format file for mobile onnxruntime builds"
        ),
        Format("hf", ("none",), None, True, "Hugging Face folder (remote code, safetensors)"),
    )
}


def get_format(name: str, *, importable: bool = False) -> Format:
    table = {k: f for k, f in FORMATS.items() if f.importable or not importable}
    if name not in table:
        raise GptsError(f"--format: unknown format {name!r}; choose from {', '.join(table)}")
    return table[name]
