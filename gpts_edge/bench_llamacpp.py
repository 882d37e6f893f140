"""llama.cpp as the bench's peer: the same weights at the same precision (f32, q8_0, q4_0).

llama.cpp has no XSA, so it runs the checkpoint's weights as a plain-GQA llama model (the
``--arch llama`` GGUF of the same config with ``exclusive_attention`` off): the same bytes per
token and the same work per step minus XSA's few element-wise nodes. Its accuracy column is
therefore measured against PyTorch fp32 on that plain-GQA checkpoint (what this file is a
quantization of), not against the XSA model.

llama-cpp-python is optional: without it these runtimes are skipped with one note.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpts_edge.errors import GptsError

if TYPE_CHECKING:
    import numpy as np

# bench runtime name -> GGUF quantization of its file
LLAMACPP_QUANTS = {"llamacpp": "f32", "llamacpp-q8_0": "q8_0", "llamacpp-q4_0": "q4_0"}
NOT_INSTALLED = "llama-cpp-python is not installed (optional: pip install llama-cpp-python)"
PLAIN_CHECKPOINT = "plain-gqa-checkpoint"


def llama_cpp_installed() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def plain_checkpoint(ckpt: Path, root: Path) -> Path:
    """The checkpoint's weights and tokenizer with XSA off (written once under ``root``)."""
    from gpts_edge.checkpoint import load_checkpoint, save_checkpoint

    plain = root / PLAIN_CHECKPOINT
    if not (plain / "model.safetensors").is_file():
        src = load_checkpoint(ckpt)
        save_checkpoint(plain, src.config.replace(exclusive_attention=False), src.weights, src.tokenizer_path)
    return plain


def prepare_llamacpp(runtime: str, ckpt: Path, root: Path, log: Callable[[str], None]) -> Path:
    """The ``--arch llama`` GGUF for ``runtime`` (one of LLAMACPP_QUANTS), exported once."""
    if not llama_cpp_installed():
        raise GptsError(f"{runtime}: {NOT_INSTALLED}")
    from gpts_edge.export.gguf import export_gguf

    quant = LLAMACPP_QUANTS[runtime]
    out = root / f"llama-plain-gqa-{quant}.gguf"
    if not out.is_file():
        export_gguf(str(plain_checkpoint(ckpt, root)), out, quant=quant, arch="llama", log=log)
    return out


class LlamaCppRuntime:
    """llama-cpp-python with an f32 KV cache, driven one call per step like the other runtimes.

    ``scoring=True`` keeps every position's logits (``forward_logits`` over whole windows, for the
    accuracy column); the bench's timed runtime keeps only the last row."""

    def __init__(self, path: str | Path, threads: int, *, scoring: bool = False, context: int = 384) -> None:
        import llama_cpp

        self.context = context
        self.llm = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=context,
            n_batch=context,
            n_ubatch=context,
            n_threads=threads,
            n_threads_batch=threads,
            type_k=llama_cpp.GGML_TYPE_F32,
            type_v=llama_cpp.GGML_TYPE_F32,
            logits_all=scoring,
            verbose=False,
        )
        self.tokenizer = None

    def new_cache(self) -> int:
        self.llm.reset()
        return 0

    def step(self, tokens: Any, cache: int) -> tuple[Any, int]:
        self.llm.eval([int(t) for t in tokens])
        # Only the last row of `scores` is written when logits_all is off; `eval_logits` would
        # copy every row into Python lists on each call.
        return self.llm.scores[self.llm.n_tokens - 1], cache + len(tokens)

    def forward_logits(self, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """(B, T) token windows -> (B, T, vocab) logits, one window at a time from an empty cache."""
        import numpy as np

        if mask is not None and not np.all(mask):
            raise GptsError("llama.cpp scoring: padded batches are not supported")
        out = []
        for row in np.asarray(ids):
            self.new_cache()
            self.llm.eval([int(t) for t in row])
            out.append(np.array(self.llm.scores[: len(row)], dtype=np.float32))
        return np.stack(out)
