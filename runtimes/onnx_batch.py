"""Batched decoding with the decode graph (``model.decode.onnx``): one KV slot per sequence.

The decode graph's GroupQueryAttention reads a fixed-size KV buffer and a per-row length
(``seqlens_k``), so rows of different lengths decode together in one run with no padding, and a
sequence can join or leave between steps without touching the others:

    kv buffer (layers, key|value, slots, kv heads, context, head dim)
    rows 0..B-1 are the active sequences; a finished row is replaced by the last active one

Exports declare the decode graph's batch as 1 (the project's runtime steps one sequence), but
every op in it is batch-generic; the graph is loaded once with that dimension made symbolic,
which needs the ``onnx`` package (the ``serve`` extra installs it). Sequences that start together
with prompts of one length prefill in one run into their (adjacent) slots; a lone one prefills
with batch 1. Then they decode with the others.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from gpts_edge.config import ModelConfig
from gpts_edge.constants import DECODE_SUFFIX
from gpts_edge.errors import GptsError
from gpts_edge.names import ONNX_DECODE_SEQLENS_K as SEQLENS_K  # int32 [batch] here: each row's length - 1
from gpts_edge.names import ONNX_DECODE_TOTAL_LENGTH as TOTAL_LENGTH  # int32 scalar: the longest row's
from gpts_edge.names import ONNX_INPUT_IDS, ONNX_LOGITS, onnx_past_names, onnx_present_names
from gpts_edge.runtimes.onnx import OnnxRuntime, session_options


def decode_graph_path(runtime: OnnxRuntime) -> Path | None:
    """The decode flavour the runtime steps with, when the export wrote one that is usable (the
    runtime has already skipped a stale one, whose offsets into model.onnx would read other bytes)."""
    path = runtime.step_path
    return path if path.name.endswith(DECODE_SUFFIX) else None


def _batch_symbolic(path: Path) -> bytes:
    """The decode graph with its batch dimension (declared 1) made symbolic."""
    try:
        import onnx
    except ImportError:
        raise GptsError(
            "batched decoding needs the onnx package to load the decode graph: pip install 'gpts-edge[serve]'"
        ) from None
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf raises its own DecodeError types
        raise GptsError(f"{path}: not a readable ONNX file ({type(exc).__name__})") from None
    for vi in [*model.graph.input, *model.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        if vi.name != TOTAL_LENGTH and len(dims) and dims[0].HasField("dim_value") and dims[0].dim_value == 1:
            dims[0].dim_param = "batch_size"
    return model.SerializeToString()


def batched_graph(runtime: OnnxRuntime) -> tuple[Path, bytes]:
    """The runtime's decode graph, serialized with its batch dimension made symbolic."""
    path = decode_graph_path(runtime)
    if path is None:
        raise GptsError(f"{runtime.path}: no decode graph (*{DECODE_SUFFIX}) to batch with")
    return path, _batch_symbolic(path)


class BatchedDecoder:
    """``slots`` KV slots over one onnxruntime session of the decode graph.

    Not thread-safe: one owner (the server's scheduler thread) calls it.
    """

    def __init__(self, runtime: OnnxRuntime, slots: int, threads: int = 1) -> None:
        path, graph = batched_graph(runtime)
        self._open(runtime.config, graph, slots, threads, str(path))

    @classmethod
    def from_graph(
        cls, config: ModelConfig, graph: bytes, slots: int, threads: int = 1, name: str = "decode graph"
    ) -> BatchedDecoder:
        """Over a graph ``batched_graph`` made (in another process, say): no runtime, no onnx package."""
        self = cls.__new__(cls)
        self._open(config, graph, slots, threads, name)
        return self

    def _open(self, cfg: ModelConfig, graph: bytes, slots: int, threads: int, name: str) -> None:
        import onnxruntime as ort

        if slots < 1:
            raise GptsError(f"slots: expected a positive integer, found {slots}")
        self.config = cfg
        self.slots = slots
        try:
            self.session = ort.InferenceSession(
                graph, session_options(threads), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises several private exception types
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise GptsError(f"{name}: cannot run the decode graph batched ({first[:200]})") from None
        self.row_shape = (cfg.num_kv_heads, cfg.context_length, cfg.head_dim)
        self._kv_names = list(zip(onnx_past_names(cfg), onnx_present_names(cfg), strict=True))
        # (layers, key|value, slots, kv heads, context, head dim); positions >= length are never read.
        self.kv = np.zeros((cfg.num_layers, 2, slots, *self.row_shape), dtype=np.float32)
        self.lengths = np.zeros(slots, dtype=np.int64)
        self._ids = np.zeros((slots, 1), dtype=np.int64)
        self._seqlens = np.zeros(slots, dtype=np.int32)
        self._total = np.zeros((), dtype=np.int32)
        self._logits = np.zeros((slots, 1, cfg.vocab_size), dtype=np.float32)
        self._io = self.session.io_binding()
        self._io.bind_input(TOTAL_LENGTH, "cpu", 0, np.int32, [], self._total.ctypes.data)
        self._bound_rows = 0

    def _bind_kv(self, io: Any, rows: slice, n: int) -> None:
        shape = [n, *self.row_shape]
        for k, (past, present) in enumerate(self._kv_names):  # layer k // 2, key (0) or value (1)
            ptr = self.kv[k // 2, k % 2, rows].ctypes.data
            io.bind_input(past, "cpu", 0, np.float32, shape, ptr)
            io.bind_output(present, "cpu", 0, np.float32, shape, ptr)

    def prefill(self, row: int, ids: list[int]) -> np.ndarray:
        """Read ``ids`` into slot ``row`` from an empty cache; the next-token logits (vocab,)."""
        return self.prefill_rows(row, [ids])[0]

    def prefill_rows(self, first: int, prompts: list[list[int]]) -> np.ndarray:
        """Read prompts of one length into slots first, first + 1, ... from empty caches, in one
        run; their next-token logits (rows, vocab). Rows of different lengths cannot share a run:
        the graph's logits are the last position's, and its rotary positions start at 0 per row,
        so neither right nor left padding gives each row its own result."""
        n, length = len(prompts), len(prompts[0])
        if not 1 <= length <= self.config.context_length or any(len(p) != length for p in prompts):
            raise GptsError(
                f"prefill: expected prompts of one length in 1..{self.config.context_length}, "
                f"found lengths {sorted({len(p) for p in prompts})}"
            )
        io = self.session.io_binding()
        arr = np.asarray(prompts, dtype=np.int64).reshape(n, length)
        seqlens = np.full(n, length - 1, dtype=np.int32)
        total = np.array(length, dtype=np.int32)
        logits = np.zeros((n, 1, self.config.vocab_size), dtype=np.float32)
        io.bind_input(ONNX_INPUT_IDS, "cpu", 0, np.int64, [n, length], arr.ctypes.data)
        io.bind_input(SEQLENS_K, "cpu", 0, np.int32, [n], seqlens.ctypes.data)
        io.bind_input(TOTAL_LENGTH, "cpu", 0, np.int32, [], total.ctypes.data)
        io.bind_output(ONNX_LOGITS, "cpu", 0, np.float32, [n, 1, self.config.vocab_size], logits.ctypes.data)
        self._bind_kv(io, slice(first, first + n), n)
        self.session.run_with_iobinding(io)
        self.lengths[first : first + n] = length
        return logits[:, 0]

    def decode(self, tokens: list[int]) -> np.ndarray:
        """One token for each of rows 0..B-1 (B = len(tokens)); their logits (B, vocab), a view
        that the next call overwrites."""
        b = len(tokens)
        if b != self._bound_rows:
            io = self._io
            io.bind_input(ONNX_INPUT_IDS, "cpu", 0, np.int64, [b, 1], self._ids.ctypes.data)
            io.bind_input(SEQLENS_K, "cpu", 0, np.int32, [b], self._seqlens.ctypes.data)
            io.bind_output(
                ONNX_LOGITS, "cpu", 0, np.float32, [b, 1, self.config.vocab_size], self._logits.ctypes.data
            )
            self._bind_kv(io, slice(0, b), b)
            self._bound_rows = b
        lengths = self.lengths[:b]
        if int(lengths.max()) >= self.config.context_length:
            raise GptsError(f"decode: a row is full (context {self.config.context_length}); slide it first")
        self._ids[:b, 0] = tokens
        self._seqlens[:b] = lengths  # total after this token - 1
        self._total[...] = int(lengths.max()) + 1
        self.session.run_with_iobinding(self._io)
        lengths += 1
        return self._logits[:b, 0]

    def move(self, src: int, dst: int) -> None:
        """Copy slot ``src`` (its filled positions) into slot ``dst``."""
        n = int(self.lengths[src])
        self.kv[:, :, dst, :, :n] = self.kv[:, :, src, :, :n]
        self.lengths[dst] = n
