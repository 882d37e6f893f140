"""GGUF files: validated reading, the embedded tokenizer, and a numpy runtime (no torch).

Layout written by ``gpts_edge.export.gguf`` and accepted here:

- architecture ``gpts`` (XGQA; q/k rows in the checkpoint's HF "rotate half" RoPE layout, i.e.
  what llama.cpp calls NEOX RoPE) or ``llama`` (plain GQA only; q/k rows permuted to GGML's
  interleaved RoPE layout, as llama.cpp's converter writes them, and un-permuted here);
- hyper-parameters under ``<arch>.*`` keys, ``gpts.attention.exclusive`` for XSA;
- llama.cpp tensor names from the one name table (gpts_edge/names.py); the head is tied to
  ``token_embd`` (no ``output.weight``);
- the byte-level BPE tokenizer as ``tokenizer.ggml.*`` (model ``gpt2``, pre ``gpt-2``).

Reading never trusts a count or offset in the file: a structural scan checks every length against
the file size before gguf-py's ``GGUFReader`` (which memory-maps the file and would loop over a
corrupt array count) sees it. Anything wrong is one ``GptsError`` line.
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gpts_edge.checkpoint import DEFAULT_GENERATION
from gpts_edge.config import ModelConfig
from gpts_edge.errors import GptsError
from gpts_edge.names import checkpoint_name_from_gguf, expected_shapes

# Same constant as gpts_edge.model.XSA_EPS (a test pins the two together; importing the model
# module here would pull in torch).
XSA_EPS = 1e-12

ARCHITECTURES = ("gpts", "llama")
SUPPORTED_VERSIONS = (2, 3)
TOKENIZER_MODEL = "gpt2"
TOKENIZER_PRE = "gpt-2"
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_CONTROL = 3

# GGUF value type ids (the spec's gguf_type enum) -> struct format of the scalar.
_SCALAR_FMT = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_INT_TYPES = {0, 1, 2, 3, 4, 5, 10, 11}
_FLOAT_TYPES = {6, 12}
_BOOL = 7
_TYPE_NAMES = {
    0: "uint8",
    1: "int8",
    2: "uint16",
    3: "int16",
    4: "uint32",
    5: "int32",
    6: "float32",
    7: "bool",
    8: "string",
    9: "array",
    10: "uint64",
    11: "int64",
    12: "float64",
}

# ggml tensor types this runtime can dequantize: id -> (name, block size, bytes per block).
TENSOR_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 8: ("Q8_0", 32, 34)}
GGML_MAX_DIMS = 4


def hparam_keys(arch: str) -> dict[str, str]:
    """ModelConfig field -> GGUF key for ``arch``."""
    return {
        "context_length": f"{arch}.context_length",
        "hidden_size": f"{arch}.embedding_length",
        "num_layers": f"{arch}.block_count",
        "intermediate_size": f"{arch}.feed_forward_length",
        "num_heads": f"{arch}.attention.head_count",
        "num_kv_heads": f"{arch}.attention.head_count_kv",
        "head_dim": f"{arch}.attention.key_length",
        "rope_theta": f"{arch}.rope.freq_base",
        "rms_norm_eps": f"{arch}.attention.layer_norm_rms_epsilon",
        "vocab_size": f"{arch}.vocab_size",
    }


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotate-half rows -> GGML interleaved rows, per head (llama.cpp's converter does this for
    ``llama``: within a head, row pairs (j, j + D/2) become neighbours (2j, 2j + 1))."""
    out_dim = w.shape[0]
    return w.reshape(n_heads, 2, out_dim // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    out_dim = w.shape[0]
    return w.reshape(n_heads, out_dim // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --- structural scan ---------------------------------------------------------------------------


class _Scanner:
    """Walks the header with every read bounds-checked against the file size."""

    def __init__(self, buf: Any, size: int, path: Path) -> None:
        self.buf, self.size, self.path, self.off = buf, size, path, 0

    def fail(self, what: str) -> GptsError:
        return GptsError(f"{self.path}: {what}")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.off + n > self.size:
            raise self.fail(
                f"truncated GGUF file: {what} needs {n} bytes at offset {self.off}, "
                f"file has {self.size} bytes"
            )

    def unpack(self, fmt: str, what: str) -> Any:
        n = struct.calcsize("<" + fmt)
        self.need(n, what)
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.off)
        self.off += n
        return value

    def string(self, what: str) -> str:
        n = self.unpack("Q", f"{what} length")
        self.need(n, what)
        raw = bytes(self.buf[self.off : self.off + n])
        self.off += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8") from None

    def skip_string(self, what: str) -> None:
        n = self.unpack("Q", f"{what} length")
        self.need(n, what)
        self.off += n

    def value(self, vtype: int, key: str) -> Any:
        """Skip (or, for small scalars, return) a value; arrays are checked and skipped."""
        if vtype in _SCALAR_FMT:
            return self.unpack(_SCALAR_FMT[vtype], f"value of {key!r}")
        if vtype == _STRING:
            self.skip_string(f"value of {key!r}")
            return None
        if vtype == _ARRAY:
            itype = self.unpack("I", f"array type of {key!r}")
            count = self.unpack("Q", f"array length of {key!r}")
            if itype in _SCALAR_FMT:
                self.need(count * struct.calcsize("<" + _SCALAR_FMT[itype]), f"array {key!r} ({count} items)")
                self.off += count * struct.calcsize("<" + _SCALAR_FMT[itype])
            elif itype == _STRING:
                # Each string has at least its 8-byte length: bound the loop before running it.
                self.need(count * 8, f"string array {key!r} ({count} items)")
                for _ in range(count):
                    self.skip_string(f"item of {key!r}")
            else:
                raise self.fail(f"key {key!r}: unsupported array item type {itype}")
            return None
        raise self.fail(f"key {key!r}: unknown GGUF value type {vtype}")


def scan_gguf(path: Path) -> None:
    """Check magic, version, every key/value and tensor record, alignment and tensor data extents."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise GptsError(f"{path}: cannot read ({exc.strerror})") from None
    if size < 24:
        if size >= 4 and path.read_bytes()[:4] != b"GGUF":
            raise GptsError(
                f"{path}: not a GGUF file (bad magic {path.read_bytes()[:4]!r}, expected b'GGUF')"
            )
        raise GptsError(f"{path}: truncated GGUF file ({size} bytes, the header alone needs 24)")
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        s = _Scanner(buf, size, path)
        magic = bytes(buf[:4])
        if magic != b"GGUF":
            raise GptsError(f"{path}: not a GGUF file (bad magic {magic!r}, expected b'GGUF')")
        s.off = 4
        version = s.unpack("I", "version")
        if version not in SUPPORTED_VERSIONS:
            raise GptsError(
                f"{path}: unsupported GGUF version {version} (expected one of {SUPPORTED_VERSIONS})"
            )
        n_tensors = s.unpack("Q", "tensor count")
        n_kv = s.unpack("Q", "key/value count")
        # A key/value record is at least 13 bytes, a tensor record at least 24.
        if n_kv * 13 > size or n_tensors * 24 > size:
            raise GptsError(
                f"{path}: truncated or corrupt GGUF header: {n_kv} keys and {n_tensors} tensors cannot fit in {size} bytes"
            )
        alignment = 32
        seen: set[str] = set()
        for _ in range(n_kv):
            key = s.string("key")
            if key in seen:
                raise GptsError(f"{path}: duplicate key {key!r}")
            seen.add(key)
            vtype = s.unpack("I", f"type of {key!r}")
            value = s.value(vtype, key)
            if key == "general.alignment":
                if vtype != 4 or not value or value & (value - 1):
                    raise GptsError(
                        f"{path}: key 'general.alignment': expected a power-of-two uint32, "
                        f"found {value!r} ({_TYPE_NAMES.get(vtype, vtype)})"
                    )
                alignment = value
        records = []
        names: set[str] = set()
        for _ in range(n_tensors):
            name = s.string("tensor name")
            if name in names:
                raise GptsError(f"{path}: duplicate tensor {name!r}")
            names.add(name)
            n_dims = s.unpack("I", f"dimension count of tensor {name!r}")
            if not 1 <= n_dims <= GGML_MAX_DIMS:
                raise GptsError(
                    f"{path}: tensor {name!r}: expected 1 to {GGML_MAX_DIMS} dimensions, found {n_dims}"
                )
            dims = [s.unpack("Q", f"dimensions of tensor {name!r}") for _ in range(n_dims)]
            ttype = s.unpack("I", f"type of tensor {name!r}")
            offset = s.unpack("Q", f"offset of tensor {name!r}")
            records.append((name, dims, ttype, offset))
        data_start = -(-s.off // alignment) * alignment
        for name, dims, ttype, offset in records:
            if ttype not in TENSOR_TYPES:
                raise GptsError(
                    f"{path}: tensor {name!r}: unsupported ggml type {ttype} (this runtime reads "
                    f"{', '.join(v[0] for v in TENSOR_TYPES.values())})"
                )
            tname, block, type_size = TENSOR_TYPES[ttype]
            if any(d <= 0 for d in dims) or dims[0] % block:
                raise GptsError(f"{path}: tensor {name!r}: invalid shape {dims} for type {tname}")
            n_elements = 1
            for d in dims:
                n_elements *= d
            n_bytes = n_elements // block * type_size
            if offset % alignment:
                raise GptsError(
                    f"{path}: tensor {name!r}: data offset {offset} is not {alignment}-byte aligned"
                )
            end = data_start + offset + n_bytes
            if end > size:
                raise GptsError(
                    f"{path}: truncated GGUF file: tensor {name!r} needs bytes up to {end}, file has {size}"
                )


# --- reading -----------------------------------------------------------------------------------


@dataclass
class GGUFModel:
    """A validated GGUF file: config, fp32 weights under checkpoint names, tokenizer.json text."""

    path: Path
    arch: str
    config: ModelConfig
    weights: dict[str, np.ndarray]
    tensor_types: dict[str, str]  # GGUF tensor name -> ggml type name
    tokenizer_json: str
    generation: dict[str, Any]
    metadata: dict[str, Any]  # the small scalar/string keys


def _open_reader(path: Path) -> Any:
    try:
        from gguf import GGUFReader
    except ImportError:
        raise GptsError(
            "reading GGUF needs the 'gguf' package (pip install 'gpts-edge[export]' or gguf)"
        ) from None
    scan_gguf(path)
    try:
        return GGUFReader(path, "r")
    except (ValueError, KeyError, IndexError, TypeError, OverflowError, UnicodeDecodeError, OSError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise GptsError(f"{path}: not a readable GGUF file ({first})") from None


class _Fields:
    def __init__(self, reader: Any, path: Path) -> None:
        self.reader, self.path = reader, path

    def _field(self, key: str) -> Any:
        field = self.reader.get_field(key)
        if field is None:
            raise GptsError(f"{self.path}: missing required key {key!r}")
        return field

    def has(self, key: str) -> bool:
        return self.reader.get_field(key) is not None

    def _type_error(self, key: str, expected: str, field: Any) -> GptsError:
        found = "/".join(_TYPE_NAMES.get(int(t), str(int(t))) for t in field.types)
        return GptsError(f"{self.path}: key {key!r}: expected {expected}, found {found}")

    def integer(self, key: str, positive: bool = True) -> int:
        field = self._field(key)
        if len(field.types) != 1 or int(field.types[0]) not in _INT_TYPES:
            raise self._type_error(key, "an integer", field)
        value = int(field.parts[-1][0])
        if positive and value <= 0:
            raise GptsError(f"{self.path}: key {key!r}: expected a positive integer, found {value}")
        return value

    def number(self, key: str) -> float:
        field = self._field(key)
        if len(field.types) != 1 or int(field.types[0]) not in _FLOAT_TYPES:
            raise self._type_error(key, "a float", field)
        value = field.parts[-1][0]
        # float32 keys: the shortest decimal that round-trips in float32 (1e-06, not 9.99999997e-07).
        return float(str(value)) if value.dtype == np.float32 else float(value)

    def boolean(self, key: str) -> bool:
        field = self._field(key)
        if len(field.types) != 1 or int(field.types[0]) != _BOOL:
            raise self._type_error(key, "a bool", field)
        return bool(field.parts[-1][0])

    def string(self, key: str) -> str:
        field = self._field(key)
        if len(field.types) != 1 or int(field.types[0]) != _STRING:
            raise self._type_error(key, "a string", field)
        return _decode(field.parts[-1], key, self.path)

    def strings(self, key: str) -> list[str]:
        field = self._field(key)
        if [int(t) for t in field.types] != [_ARRAY, _STRING]:
            raise self._type_error(key, "an array of strings", field)
        return [_decode(field.parts[i], key, self.path) for i in field.data]

    def integers(self, key: str) -> np.ndarray:
        field = self._field(key)
        if len(field.types) != 2 or int(field.types[0]) != _ARRAY or int(field.types[1]) not in _INT_TYPES:
            raise self._type_error(key, "an array of integers", field)
        if not field.data:
            return np.zeros(0, dtype=np.int64)
        # Scalar array items are contiguous in the file: one view instead of a part per item.
        first = field.parts[field.data[0]]
        start = first.ctypes.data - self.reader.data.ctypes.data
        view = self.reader.data[start : start + first.itemsize * len(field.data)].view(first.dtype)
        return view.astype(np.int64)


def _decode(raw: np.ndarray, key: str, path: Path) -> str:
    try:
        return raw.tobytes().decode("utf-8")
    except UnicodeDecodeError:
        raise GptsError(f"{path}: key {key!r}: string is not valid UTF-8") from None


def read_config(fields: _Fields, path: Path) -> tuple[str, ModelConfig]:
    arch = fields.string("general.architecture")
    if arch not in ARCHITECTURES:
        raise GptsError(f"{path}: unknown architecture {arch!r} (expected one of {', '.join(ARCHITECTURES)})")
    keys = hparam_keys(arch)
    values: dict[str, Any] = {}
    for field, key in keys.items():
        if field in ("rope_theta", "rms_norm_eps"):
            values[field] = fields.number(key)
        elif field == "head_dim" and arch == "llama" and not fields.has(key):
            values[field] = fields.integer(keys["hidden_size"]) // fields.integer(keys["num_heads"])
        elif field == "vocab_size" and arch == "llama" and not fields.has(key):
            values[field] = len(fields.strings("tokenizer.ggml.tokens"))
        else:
            values[field] = fields.integer(key)
    value_key = f"{arch}.attention.value_length"
    if fields.has(value_key) and fields.integer(value_key) != values["head_dim"]:
        raise GptsError(
            f"{path}: key {value_key!r}: expected {values['head_dim']} (= key_length), found "
            f"{fields.integer(value_key)}"
        )
    if arch == "gpts":
        values["exclusive_attention"] = fields.boolean("gpts.attention.exclusive")
    else:
        values["exclusive_attention"] = False
    values["bos_token_id"] = fields.integer("tokenizer.ggml.bos_token_id", positive=False)
    values["eos_token_id"] = fields.integer("tokenizer.ggml.eos_token_id", positive=False)
    try:
        cfg = ModelConfig(**values)
    except GptsError as exc:
        raise GptsError(f"{path}: {exc}") from None
    for key in ("bos_token_id", "eos_token_id"):
        if not 0 <= values[key] < cfg.vocab_size:
            raise GptsError(
                f"{path}: key 'tokenizer.ggml.{key}': expected an id below {cfg.vocab_size}, "
                f"found {values[key]}"
            )
    return arch, cfg


def tokenizer_json_from_fields(
    tokens: list[str], token_types: np.ndarray, merges: list[str], source: str
) -> str:
    """tokenizer.json text (the layout gpts_edge/tokenizer.py trains) from ``tokenizer.ggml.*``."""
    if len(token_types) != len(tokens):
        raise GptsError(
            f"{source}: key 'tokenizer.ggml.token_type': expected {len(tokens)} items (one per token), "
            f"found {len(token_types)}"
        )
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        if tok in vocab:
            raise GptsError(
                f"{source}: key 'tokenizer.ggml.tokens': token {tok!r} appears twice "
                f"(ids {vocab[tok]} and {i})"
            )
        vocab[tok] = i
    added = []
    for i, t in enumerate(token_types.tolist()):
        if t == TOKEN_TYPE_CONTROL:
            added.append(
                {
                    "id": i,
                    "content": tokens[i],
                    "single_word": False,
                    "lstrip": False,
                    "rstrip": False,
                    "normalized": False,
                    "special": True,
                }
            )
        elif t != TOKEN_TYPE_NORMAL:
            raise GptsError(
                f"{source}: key 'tokenizer.ggml.token_type': token {i} has type {t}; this "
                f"reader supports normal ({TOKEN_TYPE_NORMAL}) and control ({TOKEN_TYPE_CONTROL})"
            )
    pairs = []
    for m in merges:
        parts = m.split(" ")
        if (
            len(parts) != 2
            or parts[0] not in vocab
            or parts[1] not in vocab
            or parts[0] + parts[1] not in vocab
        ):
            raise GptsError(f"{source}: key 'tokenizer.ggml.merges': invalid merge {m!r}")
        pairs.append(parts)
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    data = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": byte_level,
        "post_processor": None,
        "decoder": {**byte_level, "add_prefix_space": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": pairs,
        },
    }
    return json.dumps(data, ensure_ascii=False, indent=2)


def tokenizer_from_json(text: str, source: str, vocab_size: int) -> Any:
    from tokenizers import Tokenizer

    from gpts_edge.tokenizer import EOT, EOT_ID

    try:
        tok = Tokenizer.from_str(text)
    except Exception as exc:  # tokenizers raises a bare Exception on malformed input
        raise GptsError(f"{source}: embedded tokenizer is invalid ({str(exc).splitlines()[0]})") from None
    if tok.get_vocab_size() != vocab_size:
        raise GptsError(f"{source}: tokenizer has {tok.get_vocab_size()} tokens, expected {vocab_size}")
    if tok.token_to_id(EOT) != EOT_ID:
        raise GptsError(f"{source}: tokenizer: expected {EOT} at id {EOT_ID}")
    return tok


def _read_tokenizer(fields: _Fields, path: Path, cfg: ModelConfig) -> str:
    model = fields.string("tokenizer.ggml.model")
    if model != TOKENIZER_MODEL:
        raise GptsError(f"{path}: key 'tokenizer.ggml.model': expected {TOKENIZER_MODEL!r}, found {model!r}")
    if fields.has("tokenizer.ggml.pre"):
        pre = fields.string("tokenizer.ggml.pre")
        if pre != TOKENIZER_PRE:
            raise GptsError(f"{path}: key 'tokenizer.ggml.pre': expected {TOKENIZER_PRE!r}, found {pre!r}")
    tokens = fields.strings("tokenizer.ggml.tokens")
    if len(tokens) != cfg.vocab_size:
        raise GptsError(
            f"{path}: key 'tokenizer.ggml.tokens': expected {cfg.vocab_size} tokens (vocab_size), "
            f"found {len(tokens)}"
        )
    types = fields.integers("tokenizer.ggml.token_type")
    merges = fields.strings("tokenizer.ggml.merges")
    return tokenizer_json_from_fields(tokens, types, merges, str(path))


def _read_generation(fields: _Fields) -> dict[str, Any]:
    gen = dict(DEFAULT_GENERATION)
    optional = {
        "general.sampling.temp": ("temperature", fields.number),
        "general.sampling.top_p": ("top_p", fields.number),
        "general.sampling.top_k": ("top_k", lambda k: fields.integer(k, positive=False)),
        "general.sampling.penalty_repeat": ("repetition_penalty", fields.number),
    }
    for key, (name, get) in optional.items():
        if fields.has(key):
            gen[name] = get(key)
    gen["bos_token_id"] = fields.integer("tokenizer.ggml.bos_token_id", positive=False)
    gen["eos_token_id"] = fields.integer("tokenizer.ggml.eos_token_id", positive=False)
    return gen


def read_gguf(path: str | Path) -> GGUFModel:
    """Validate and load a GGUF file written for this model family (fp32 weights, HF layout)."""
    from gguf.quants import dequantize

    path = Path(path)
    if not path.is_file():
        raise GptsError(f"{path}: file not found (expected a .gguf file)")
    reader = _open_reader(path)
    fields = _Fields(reader, path)
    arch, cfg = read_config(fields, path)
    tokenizer_json = _read_tokenizer(fields, path, cfg)
    generation = _read_generation(fields)
    expected = expected_shapes(cfg)
    weights: dict[str, np.ndarray] = {}
    types: dict[str, str] = {}
    for t in reader.tensors:
        name = checkpoint_name_from_gguf(t.name) if _known(t.name) else None
        if name is None or name not in expected:
            raise GptsError(f"{path}: unexpected tensor {t.name!r} (not in the name table for this config)")
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if shape != expected[name]:
            raise GptsError(
                f"{path}: tensor {t.name!r}: expected shape {list(reversed(expected[name]))} (GGUF order), "
                f"found {list(reversed(shape))}"
            )
        ttype = int(t.tensor_type)
        types[t.name] = TENSOR_TYPES[ttype][0]
        try:
            w = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        except (ValueError, NotImplementedError) as exc:
            raise GptsError(f"{path}: tensor {t.name!r}: cannot dequantize ({exc})") from None
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            w = unpermute_qk(w, cfg.num_heads if "q_proj" in name else cfg.num_kv_heads)
        weights[name] = w
    missing = [n for n in expected if n not in weights]
    if missing:
        from gpts_edge.names import gguf_name

        raise GptsError(
            f"{path}: missing tensor {gguf_name(missing[0])!r}"
            + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
        )
    metadata = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or not field.types or int(field.types[0]) == _ARRAY:
            continue
        metadata[key] = (
            _decode(field.parts[-1], key, path)
            if int(field.types[0]) == _STRING
            else field.parts[-1].tolist()[0]
        )
    return GGUFModel(path, arch, cfg, weights, types, tokenizer_json, generation, metadata)


def _known(gguf_tensor_name: str) -> bool:
    try:
        checkpoint_name_from_gguf(gguf_tensor_name)
    except GptsError:
        return False
    return True


# --- numpy model -------------------------------------------------------------------------------


def _rms_norm(x: np.ndarray, w: np.ndarray, eps: np.float32) -> np.ndarray:
    return x * (1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)) * w


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


class NumpyGPTS:
    """The reference forward (gpts_edge/model.py) in float32 numpy."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, np.ndarray]) -> None:
        self.cfg = cfg
        f32 = np.float32
        self.embed = np.ascontiguousarray(weights["model.embed_tokens.weight"], dtype=f32)
        self.head = np.ascontiguousarray(self.embed.T)
        self.eps = f32(cfg.rms_norm_eps)
        self.layers = []
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."

            def t(name: str, p: str = p) -> np.ndarray:
                return np.ascontiguousarray(weights[p + name].T, dtype=f32)  # (in, out): x @ w

            qkv = np.concatenate(
                [t("self_attn.q_proj.weight"), t("self_attn.k_proj.weight"), t("self_attn.v_proj.weight")],
                axis=1,
            )
            gate_up = np.concatenate([t("mlp.gate_proj.weight"), t("mlp.up_proj.weight")], axis=1)
            self.layers.append(
                {
                    "attn_norm": weights[p + "input_layernorm.weight"].astype(f32),
                    "qkv": qkv,
                    "o": t("self_attn.o_proj.weight"),
                    "ffn_norm": weights[p + "post_attention_layernorm.weight"].astype(f32),
                    "gate_up": gate_up,
                    "down": t("mlp.down_proj.weight"),
                }
            )
        self.norm = weights["model.norm.weight"].astype(f32)
        hd = cfg.head_dim
        self.inv_freq = f32(cfg.rope_theta) ** (-np.arange(0, hd, 2, dtype=f32) / f32(hd))

    def _rope(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin (B, 1, T, D) in the rotate-half layout (cat(freqs, freqs))."""
        freqs = positions.astype(np.float32)[..., None] * self.inv_freq
        emb = np.concatenate([freqs, freqs], axis=-1)
        return np.cos(emb)[:, None], np.sin(emb)[:, None]

    @staticmethod
    def _apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        half = x.shape[-1] // 2
        rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * cos + rotated * sin

    def forward(
        self,
        ids: np.ndarray,
        past: list[tuple[np.ndarray, np.ndarray]] | None,
        positions: np.ndarray,
        attention_mask: np.ndarray | None,
    ) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
        """Logits (B, T, V) and this call's new (k, v) per layer, each (B, KV, T, D).

        ``past``: per layer (k, v) of shape (B, KV, P, D); ``attention_mask``: (B, P + T) or None.
        """
        cfg = self.cfg
        B, T = ids.shape
        P = past[0][0].shape[2] if past else 0
        H, KV, D, G = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.group_size
        cos, sin = self._rope(positions)
        bias = None
        if attention_mask is not None or P:
            S = P + T
            q_pos = np.arange(P, S)[:, None]
            allowed = (np.arange(S)[None, :] <= q_pos)[None]  # (1, T, S)
            if attention_mask is not None:
                allowed = allowed & (np.asarray(attention_mask)[:, None, :] != 0)
                # A query whose keys are all padding would get NaN; let it see itself (as model.py).
                allowed = allowed | (np.arange(S)[None, :] == q_pos)[None]
            bias = np.where(allowed, np.float32(0), np.float32(-np.inf))[:, None, None]  # (B, 1, 1, T, S)
        else:
            causal = np.triu(np.full((T, T), -np.inf, dtype=np.float32), k=1)
            bias = causal[None, None, None]
        scale = np.float32(1.0 / np.sqrt(D))
        x = self.embed[ids]
        new_kv = []
        for i, lw in enumerate(self.layers):
            h = _rms_norm(x, lw["attn_norm"], self.eps)
            qkv = h @ lw["qkv"]
            q = qkv[..., : H * D].reshape(B, T, H, D).transpose(0, 2, 1, 3)
            k = qkv[..., H * D : (H + KV) * D].reshape(B, T, KV, D).transpose(0, 2, 1, 3)
            v = qkv[..., (H + KV) * D :].reshape(B, T, KV, D).transpose(0, 2, 1, 3)
            q, k = self._apply_rope(q, cos, sin), self._apply_rope(k, cos, sin)
            v = np.ascontiguousarray(v)
            new_kv.append((k, v))
            if past:
                k_all = np.concatenate([past[i][0], k], axis=2)
                v_all = np.concatenate([past[i][1], v], axis=2)
            else:
                k_all, v_all = k, v
            qg = q.reshape(B, KV, G, T, D)  # query head h = g_kv * G + j reads KV head g_kv
            scores = (qg @ k_all[:, :, None].swapaxes(-1, -2)) * scale + bias  # (B, KV, G, T, S)
            scores -= scores.max(axis=-1, keepdims=True)
            probs = np.exp(scores)
            probs /= probs.sum(axis=-1, keepdims=True)
            y = probs @ v_all[:, :, None]  # (B, KV, G, T, D)
            if cfg.exclusive_attention:
                vc = v[:, :, None]  # this call's values, same position as the query
                yv = np.sum(y * vc, axis=-1, keepdims=True)
                vv = np.maximum(np.sum(vc * vc, axis=-1, keepdims=True), np.float32(XSA_EPS))
                y = y - (yv / vv) * vc
            y = y.reshape(B, H, T, D).transpose(0, 2, 1, 3).reshape(B, T, H * D)
            x = x + y @ lw["o"]
            h = _rms_norm(x, lw["ffn_norm"], self.eps)
            gu = h @ lw["gate_up"]
            f = cfg.intermediate_size
            x = x + (_silu(gu[..., :f]) * gu[..., f:]) @ lw["down"]
        x = _rms_norm(x, self.norm, self.eps)
        return x @ self.head, new_kv


class KVCache:
    """Preallocated per-layer key/value buffers for one sequence; grows when full."""

    def __init__(self, cfg: ModelConfig) -> None:
        shape = (1, cfg.num_kv_heads, cfg.context_length, cfg.head_dim)
        self.k = [np.zeros(shape, np.float32) for _ in range(cfg.num_layers)]
        self.v = [np.zeros(shape, np.float32) for _ in range(cfg.num_layers)]
        self.length = 0

    def past(self) -> list[tuple[np.ndarray, np.ndarray]] | None:
        n = self.length
        return [(k[:, :, :n], v[:, :, :n]) for k, v in zip(self.k, self.v, strict=True)] if n else None

    def append(self, new: list[tuple[np.ndarray, np.ndarray]]) -> None:
        t = new[0][0].shape[2]
        end = self.length + t
        if end > self.k[0].shape[2]:
            grow = max(end, 2 * self.k[0].shape[2])
            self.k = [
                np.concatenate([k, np.zeros_like(k[:, :, : grow - k.shape[2]])], axis=2) for k in self.k
            ]
            self.v = [
                np.concatenate([v, np.zeros_like(v[:, :, : grow - v.shape[2]])], axis=2) for v in self.v
            ]
        for i, (k, v) in enumerate(new):
            self.k[i][:, :, self.length : end] = k
            self.v[i][:, :, self.length : end] = v
        self.length = end


class _BlasThreads:
    """Scoped thread count for numpy's OpenBLAS (found among the loaded libraries, Linux only).

    A decode step multiplies matrices of a few hundred KB: OpenBLAS's thread pool costs more than
    it saves there, and on a busy machine waiting for its threads made decoding ~10x slower.
    Elsewhere (no /proc, Accelerate, MKL) this does nothing.
    """

    _funcs: tuple[Any, Any] | None | bool = False  # False: not looked up yet

    @classmethod
    def _lookup(cls) -> tuple[Any, Any] | None:
        if cls._funcs is False:
            cls._funcs = None
            try:
                import ctypes

                with open("/proc/self/maps") as fh:
                    libs = {line.split()[-1] for line in fh if "openblas" in line.lower() and "/" in line}
                for lib in sorted(libs):
                    handle = ctypes.CDLL(lib)
                    for suffix in ("64_", "", "_64"):
                        for prefix in ("scipy_openblas", "openblas"):
                            setter = getattr(handle, f"{prefix}_set_num_threads{suffix}", None)
                            getter = getattr(handle, f"{prefix}_get_num_threads{suffix}", None)
                            if setter is not None and getter is not None:
                                setter.argtypes, setter.restype, getter.restype = (
                                    [ctypes.c_int],
                                    None,
                                    ctypes.c_int,
                                )
                                cls._funcs = (getter, setter)
                                return cls._funcs
            except (OSError, AttributeError):
                cls._funcs = None
        return cls._funcs  # type: ignore[return-value]

    def __init__(self, n: int | None) -> None:
        self.n, self.prev = n, None

    def __enter__(self) -> None:
        funcs = self._lookup() if self.n else None
        if funcs:
            self.prev = funcs[0]()
            if self.prev != self.n:
                funcs[1](self.n)

    def __exit__(self, *exc: object) -> None:
        funcs = self._funcs
        if self.prev is not None and funcs and self.prev != self.n:
            funcs[1](self.prev)


class GGUFRuntime:
    """A GGUF file as a Runtime: dequantized once, run in numpy with a KV cache.

    ``threads``: BLAS threads for every call; by default single-token steps use one thread and
    ``forward_logits`` leaves numpy's setting alone.
    """

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        if threads is not None and threads < 1:
            raise GptsError(f"--threads: expected a positive integer, found {threads}")
        self.threads = threads
        model = read_gguf(path)
        self.path = model.path
        self.arch = model.arch
        self.config = model.config
        self.generation_config = model.generation
        self.tensor_types = model.tensor_types
        self.metadata = model.metadata
        self.tokenizer_json = model.tokenizer_json
        self.tokenizer = tokenizer_from_json(model.tokenizer_json, str(self.path), self.config.vocab_size)
        self.model = NumpyGPTS(self.config, model.weights)

    def new_cache(self) -> KVCache:
        return KVCache(self.config)

    def step(self, tokens: np.ndarray, cache: KVCache | None) -> tuple[np.ndarray, KVCache]:
        ids = np.asarray(tokens, dtype=np.int64).reshape(1, -1)
        if ids.size == 0:
            raise GptsError("step: expected at least one token")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise GptsError(
                f"step: token ids must be in [0, {self.config.vocab_size}), found {ids.min()}..{ids.max()}"
            )
        cache = cache if cache is not None else self.new_cache()
        positions = np.arange(cache.length, cache.length + ids.shape[1])[None]
        with _BlasThreads(self.threads or 1):
            logits, new = self.model.forward(ids, cache.past(), positions, None)
        cache.append(new)
        return logits[0, -1], cache

    def forward_logits(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        """Full-sequence logits (B, T, vocab) for scoring; left padding via attention_mask."""
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim != 2:
            raise GptsError(f"input_ids: expected shape [batch, time], found {list(ids.shape)}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise GptsError(f"input_ids: ids must be in [0, {self.config.vocab_size})")
        if attention_mask is None:
            positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
            mask = None
        else:
            mask = np.asarray(attention_mask, dtype=np.int64)
            if mask.shape != ids.shape:
                raise GptsError(f"attention_mask: expected shape {list(ids.shape)}, found {list(mask.shape)}")
            positions = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)
        with _BlasThreads(self.threads):
            logits, _ = self.model.forward(ids, None, positions, mask)
        return logits
