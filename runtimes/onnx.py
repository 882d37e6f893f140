"""Run an exported ONNX folder with onnxruntime, numpy and tokenizers only (never torch).

Applications open models through ``gpts_edge.load`` / ``gpts_edge.api.open_runtime``, which turn a
checkpoint into a cached export first; this module only runs exports.

One onnxruntime session serves every call: the prompt is prefilled in one run, then each new
token is one run that feeds back the ``present.*`` tensors as ``past_key_values.*``. Sampling is
the project's shared sampler (gpts_edge.sampling), so every runtime draws the same tokens.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gpts_edge.checkpoint import load_generation_config
from gpts_edge.config import ModelConfig
from gpts_edge.constants import (
    CONFIG_FILE,
    DECODE_SUFFIX,
    GENERATION_FILE,
    LAST_LOGITS_SUFFIX,
    ORT_MODEL_FILE,
    TOKENIZER_FILE,
    flavour_file,
)
from gpts_edge.constants import ONNX_MODEL_FILE as MODEL_FILE
from gpts_edge.errors import GptsError
from gpts_edge.fileio import hash_file
from gpts_edge.names import (
    ONNX_ATTENTION_MASK,
    ONNX_DECODE_SEQLENS_K,
    ONNX_DECODE_TOTAL_LENGTH,
    ONNX_INPUT_IDS,
    ONNX_LOGITS,
    ONNX_META_WEIGHTS_FILE,
    ONNX_META_WEIGHTS_SHA256,
    ONNX_POSITION_IDS,
    onnx_io_names,
    onnx_past_names,
    onnx_present_names,
)
from gpts_edge.tokenizer import load_tokenizer

# A 1.4M-parameter model is too small for a thread pool to pay off: one thread is fastest per
# token on edge CPUs and leaves the other cores to the application.
DEFAULT_THREADS = 1


def find_model_file(path: Path) -> Path:
    """The graph file of an exported folder (model.onnx, else model.ort, else the one .onnx) or the
    given .onnx/.ort file."""
    if path.is_file():
        # onnxruntime loads ORT-format files (`gpts-edge export --format ort`) the same way.
        if path.suffix not in (".onnx", ".ort"):
            raise GptsError(
                f"{path}: expected a .onnx or .ort file or a folder exported by `gpts-edge export --format onnx`"
            )
        return path
    if not path.exists():
        raise GptsError(f"{path}: no such file or folder")
    preferred = path / MODEL_FILE
    if preferred.is_file():
        return preferred
    if (path / ORT_MODEL_FILE).is_file():
        return path / ORT_MODEL_FILE
    found = sorted(path.glob("*.onnx"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise GptsError(f"{path}: no .onnx file in this folder (expected {MODEL_FILE})")
    raise GptsError(f"{path}: several .onnx files ({', '.join(p.name for p in found)}); pass one of them")


def flavour_path(model_path: Path, suffix: str) -> Path:
    """A graph flavour beside ``model_path``: model.onnx -> model.decode.onnx for ``DECODE_SUFFIX``,
    model.ort -> model.decode.ort (the ORT export converts each flavour to its own file)."""
    return model_path.with_name(flavour_file(model_path.name, suffix))


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(buf):
            raise ValueError("truncated varint")
        b = buf[i]
        value |= (b & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if b < 0x80:
            return value, i


def onnx_metadata(path: Path) -> dict[str, str]:
    """ModelProto.metadata_props of an ONNX file, read from the protobuf wire format (the runtime
    has no onnx package): top-level fields are skipped by length, so the graph is never parsed.
    An unreadable or malformed file gives {} (onnxruntime then reports it when opening)."""
    try:
        buf = path.read_bytes()
        meta: dict[str, str] = {}
        i = 0
        while i < len(buf):
            tag, i = _varint(buf, i)
            wire = tag & 7
            if wire == 0:
                _, i = _varint(buf, i)
                continue
            if wire != 2:  # ModelProto has only varint and length-delimited fields
                return {}
            n, i = _varint(buf, i)
            if tag >> 3 == 14:  # metadata_props: StringStringEntryProto {1: key, 2: value}
                entry, j, kv = buf[i : i + n], 0, {}
                while j < len(entry):
                    t, j = _varint(entry, j)
                    m, j = _varint(entry, j)
                    kv[t >> 3] = entry[j : j + m].decode("utf-8", "replace")
                    j += m
                meta[kv.get(1, "")] = kv.get(2, "")
            i += n
        return meta
    except (OSError, ValueError):
        return {}


def stale_flavour(path: Path) -> str | None:
    """Why the flavour graph at ``path`` must not be used, or None. A flavour written by
    ``export_onnx`` reads its weights from the full graph's file at recorded offsets; if that file
    is not the one it was exported with (a later export, a kill between two files, an edited
    model.onnx), those offsets would read other bytes, so it is skipped."""
    if path.suffix != ".onnx":
        return None  # ORT-format flavours carry their own weights
    meta = onnx_metadata(path)
    want = meta.get(ONNX_META_WEIGHTS_SHA256)
    if want is None:
        return None  # self-contained (older exports)
    source = path.with_name(meta.get(ONNX_META_WEIGHTS_FILE, ""))
    if not source.is_file() or source.parent != path.parent:
        return f"the {source.name or '?'} it reads its weights from is missing"
    if hash_file(source).hexdigest() != want:
        return f"it was exported with another {source.name}"
    return None


@dataclass
class OnnxCache:
    """The KV cache between calls: the graph's ``present.*`` outputs in input order."""

    past: list[np.ndarray]
    length: int


class _KVBuffer:
    """One preallocated KV buffer (layers, key|value, 1, kv heads, context, head dim) that the
    decode graph reads and writes in place. ``version`` counts the steps written into it, so a
    cache that is no longer the newest one of its buffer is detected and copied before use.
    ``binding`` is the buffer's own IO binding (made on its first step): every buffer, hence
    every generation, has its own, so threads decoding on one session share no mutable state."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.array = np.empty(shape, dtype=np.float32)  # positions >= length are never read
        self.version = 0
        self.binding: _Binding | None = None


@dataclass
class OnnxDecodeCache:
    """The KV cache of the decode flavour: ``length`` positions of ``buffer`` as of ``version``."""

    buffer: _KVBuffer
    length: int
    version: int


class _Binding:
    """The IO binding of one KV buffer: the buffer, the logits and the two length scalars are bound
    once and reused, so a step allocates no tensors and copies no cache."""

    def __init__(self, session: Any, cfg: ModelConfig, buf: _KVBuffer) -> None:
        self.io = session.io_binding()
        self.ids = np.zeros((1, cfg.context_length), dtype=np.int64)
        self.seqlens_k = np.zeros(1, dtype=np.int32)
        self.total = np.zeros((), dtype=np.int32)
        self.logits = np.zeros((1, 1, cfg.vocab_size), dtype=np.float32)
        self.bound_n = 0
        io = self.io
        io.bind_input(ONNX_DECODE_SEQLENS_K, "cpu", 0, np.int32, [1], self.seqlens_k.ctypes.data)
        io.bind_input(ONNX_DECODE_TOTAL_LENGTH, "cpu", 0, np.int32, [], self.total.ctypes.data)
        io.bind_output(ONNX_LOGITS, "cpu", 0, np.float32, [1, 1, cfg.vocab_size], self.logits.ctypes.data)
        shape = list(buf.array.shape[2:])
        names = zip(onnx_past_names(cfg), onnx_present_names(cfg), strict=True)
        for n, (past, present) in enumerate(names):  # layer n // 2, key (0) or value (1)
            ptr = buf.array[n // 2, n % 2].ctypes.data
            io.bind_input(past, "cpu", 0, np.float32, shape, ptr)
            io.bind_output(present, "cpu", 0, np.float32, shape, ptr)


class _DecodeStepper:
    """Runs the decode graph. It holds only the session (whose ``run`` onnxruntime allows from
    several threads at once); all buffers a step writes belong to the cache being stepped."""

    def __init__(self, session: Any, cfg: ModelConfig) -> None:
        self.session = session
        self.cfg = cfg
        self.shape = (cfg.num_layers, 2, 1, cfg.num_kv_heads, cfg.context_length, cfg.head_dim)

    def step(self, ids: np.ndarray, cache: OnnxDecodeCache) -> tuple[np.ndarray, OnnxDecodeCache]:
        """``ids`` (1, n), already checked against the vocabulary and the context length."""
        buf = cache.buffer
        if cache.version != buf.version:
            # Someone stepped on from this cache's buffer already: branch off into a copy. Positions
            # below cache.length are still this cache's (the buffer only grows past them in place).
            fresh = _KVBuffer(self.shape)
            fresh.array[..., : cache.length, :] = buf.array[..., : cache.length, :]
            buf = fresh
        b = buf.binding
        if b is None:
            b = buf.binding = _Binding(self.session, self.cfg, buf)
        n = ids.shape[1]
        total = cache.length + n
        if n == 1:
            b.ids[0, 0] = ids[0, 0]
        else:
            b.ids[0, :n] = ids[0]
        if n != b.bound_n:
            b.io.bind_input(ONNX_INPUT_IDS, "cpu", 0, np.int64, [1, n], b.ids.ctypes.data)
            b.bound_n = n
        b.seqlens_k[0] = total - 1
        b.total[...] = total
        self.session.run_with_iobinding(b.io)
        buf.version += 1
        # A copy: the bound logits buffer is overwritten by the next step.
        return b.logits[0, 0].copy(), OnnxDecodeCache(buf, total, buf.version)


def session_options(threads: int) -> Any:
    """The onnxruntime settings every session of ours uses (generation, scoring, batched serving)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if threads == 1:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # Lets constant folding turn int8 DequantizeLinear weights into float32 once at load instead
    # of dequantizing them on every call (the int8 export relies on it for its speed).
    opts.add_session_config_entry("session.disable_quant_qdq", "1")
    return opts


class OnnxRuntime:
    """The Runtime protocol of gpts_edge.generation over one onnxruntime session."""

    def __init__(self, folder: str | Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.model_path = find_model_file(Path(folder))
        self.path = self.model_path.parent
        self.config = ModelConfig.load(self.path / CONFIG_FILE)
        self.tokenizer = load_tokenizer(self.path / TOKENIZER_FILE, self.config.vocab_size)
        self.generation_config = load_generation_config(self.path / GENERATION_FILE)
        self._past_names = onnx_past_names(self.config)
        threads = DEFAULT_THREADS if threads is None else int(threads)
        if threads < 1:
            raise GptsError(f"threads: expected a positive integer, found {threads}")
        opts = session_options(threads)
        self._ort, self._opts = ort, opts
        self._session: Any = None
        self._session_lock = threading.Lock()
        cfg = self.config
        decode = flavour_path(self.model_path, DECODE_SUFFIX)
        fast = flavour_path(self.model_path, LAST_LOGITS_SUFFIX)
        self._decoder: _DecodeStepper | None = None
        decode, fast = self._usable(decode), self._usable(fast)
        self.step_path = decode or fast or self.model_path  # the graph generation steps with
        if decode is not None:
            # The full graph is then needed only for forward_logits (scoring): opened on first use,
            # which keeps cold start and memory to one session for generation.
            self.step_session = self._open(ort, decode, opts)
            self._check_decode_io(self.step_session, decode)
            self._decoder = _DecodeStepper(self.step_session, cfg)
        elif fast is not None:
            # The last-logits flavour (same I/O as the full graph), when the export wrote one.
            self.step_session = self._open(ort, fast, opts)
            self._check_io(self.step_session, fast)
        else:
            self.step_session = self.session
        self._input_names, self._output_names = onnx_io_names(cfg)
        self._empty = np.zeros((1, cfg.num_kv_heads, 0, cfg.head_dim), dtype=np.float32)

    def _usable(self, path: Path) -> Path | None:
        """``path`` when that flavour exists and belongs to this export's model file."""
        if not path.is_file():
            return None
        why = stale_flavour(path)
        if why is not None:
            print(f"note: {path}: not used ({why}); stepping with {self.model_path.name}", file=sys.stderr)
            return None
        return path

    @property
    def session(self) -> Any:
        """The full graph's session (scoring, and steps when there is no decode flavour)."""
        if self._session is None:
            with self._session_lock:  # two threads scoring at once open it once
                if self._session is None:
                    session = self._open(self._ort, self.model_path, self._opts)
                    self._check_io(session, self.model_path)
                    self._session = session
        return self._session

    def _check_decode_io(self, session: Any, path: Path) -> None:
        cfg = self.config
        want_in, want_out = onnx_io_names(cfg, "decode")
        found_in = [i.name for i in session.get_inputs()]
        found_out = [o.name for o in session.get_outputs()]
        if sorted(found_in) != sorted(want_in) or sorted(found_out) != sorted(want_out):
            raise GptsError(
                f"{path}: decode graph inputs/outputs do not match config.json ({cfg.num_layers} "
                f"layers): expected {len(want_in)} inputs and {len(want_out)} outputs, found "
                f"{len(found_in)} and {len(found_out)}"
            )
        self._check_past_shapes(session, path, "1", "max_sequence_length")

    @staticmethod
    def _open(ort: Any, path: Path, opts: Any) -> Any:
        try:
            return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises several private exception types
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise GptsError(f"{path}: not a loadable ONNX model ({first[:200]})") from None

    def _check_past_shapes(self, session: Any, path: Path, batch: str, length: str) -> None:
        cfg = self.config
        for inp in session.get_inputs():
            if inp.name in self._past_names:
                shape = list(inp.shape)
                if len(shape) != 4 or shape[1] != cfg.num_kv_heads or shape[3] != cfg.head_dim:
                    raise GptsError(
                        f"{path}: input {inp.name}: expected shape "
                        f"[{batch}, {cfg.num_kv_heads}, {length}, {cfg.head_dim}], found {shape}"
                    )

    def _check_io(self, session: Any, path: Path) -> None:
        cfg = self.config
        want_in, want_out = onnx_io_names(cfg)
        found_in = [i.name for i in session.get_inputs()]
        found_out = [o.name for o in session.get_outputs()]
        if sorted(found_in) != sorted(want_in) or sorted(found_out) != sorted(want_out):
            raise GptsError(
                f"{path}: graph inputs/outputs do not match config.json "
                f"({cfg.num_layers} layers): expected inputs {want_in[:4]}... ({len(want_in)}), "
                f"found {found_in[:4]}{'...' if len(found_in) > 4 else ''} ({len(found_in)})"
            )
        self._check_past_shapes(session, path, "batch", "past")
        logits = session.get_outputs()[found_out.index(ONNX_LOGITS)]
        vocab = logits.shape[-1] if logits.shape else None
        if isinstance(vocab, int) and vocab != cfg.vocab_size:
            raise GptsError(f"{path}: output logits: expected vocabulary {cfg.vocab_size}, found {vocab}")

    # --- Runtime protocol ------------------------------------------------------------------------

    def new_cache(self) -> OnnxCache | OnnxDecodeCache:
        if self._decoder is not None:
            return OnnxDecodeCache(_KVBuffer(self._decoder.shape), 0, 0)
        return OnnxCache([self._empty] * len(self._past_names), 0)

    def _check_ids(self, ids: np.ndarray) -> None:
        if ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            bad = int(ids.max() if ids.max() >= self.config.vocab_size else ids.min())
            raise GptsError(
                f"token id {bad} is outside the vocabulary (expected 0..{self.config.vocab_size - 1})"
            )

    def step(
        self, tokens: np.ndarray, cache: OnnxCache | OnnxDecodeCache | None
    ) -> tuple[np.ndarray, OnnxCache | OnnxDecodeCache]:
        """Run the new ``tokens`` (1-D) after ``cache``; returns the last position's logits."""
        if self._decoder is not None and type(cache) is OnnxDecodeCache:
            # The per-token path of generation, kept to a few Python operations: at ~2,000 steps/s
            # the general path's numpy checks cost ~8% of a step.
            ids = np.asarray(tokens, dtype=np.int64).reshape(1, -1)
            if ids.shape[1] == 1:
                t = int(ids[0, 0])
                if not 0 <= t < self.config.vocab_size:
                    self._check_ids(ids)
                if cache.length >= self.config.context_length:
                    raise GptsError(
                        f"sequence of {cache.length + 1} tokens is longer than the context "
                        f"(expected at most {self.config.context_length})"
                    )
                return self._decoder.step(ids, cache)
        ids = np.asarray(tokens, dtype=np.int64).reshape(1, -1)
        cache = cache if cache is not None else self.new_cache()
        if self._decoder is not None and not isinstance(cache, OnnxDecodeCache):
            raise GptsError("step: expected a cache from this runtime's new_cache(), found another kind")
        n = ids.shape[1]
        if n == 0:
            raise GptsError("step: expected at least one token, found none")
        self._check_ids(ids)
        total = cache.length + n
        if total > self.config.context_length:
            raise GptsError(
                f"sequence of {total} tokens is longer than the context "
                f"(expected at most {self.config.context_length})"
            )
        if self._decoder is not None:
            return self._decoder.step(ids, cache)  # type: ignore[arg-type]
        feeds = {
            ONNX_INPUT_IDS: ids,
            ONNX_ATTENTION_MASK: np.ones((1, total), dtype=np.int64),
            ONNX_POSITION_IDS: np.arange(cache.length, total, dtype=np.int64)[None],
        }
        feeds.update(zip(self._past_names, cache.past, strict=True))  # type: ignore[union-attr]
        out = self.step_session.run(self._output_names, feeds)
        return out[0][0, -1], OnnxCache(out[1:], total)

    def forward_logits(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        """Full-sequence logits (B, T, vocab) for scoring; left padding via ``attention_mask``."""
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise GptsError(f"input_ids: expected shape [batch, seq] with seq >= 1, found {list(ids.shape)}")
        self._check_ids(ids)
        if ids.shape[1] > self.config.context_length:
            raise GptsError(
                f"sequence of {ids.shape[1]} tokens is longer than the context "
                f"(expected at most {self.config.context_length})"
            )
        if attention_mask is None:
            mask = np.ones_like(ids)
        else:
            mask = np.asarray(attention_mask, dtype=np.int64)
            if mask.shape != ids.shape:
                raise GptsError(f"attention_mask: expected shape {list(ids.shape)}, found {list(mask.shape)}")
        pos = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)
        empty = np.zeros((ids.shape[0], self.config.num_kv_heads, 0, self.config.head_dim), dtype=np.float32)
        feeds = {ONNX_INPUT_IDS: ids, ONNX_ATTENTION_MASK: mask, ONNX_POSITION_IDS: pos}
        feeds.update(dict.fromkeys(self._past_names, empty))
        return self.session.run([ONNX_LOGITS], feeds)[0]
