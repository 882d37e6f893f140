"""The GGUF format contract, read by the exporter and the runtime alike: constants, the
``<arch>.*`` key names, the q/k permutation of the ``llama`` arch, a bounds-checked structural
scan, and the validated reader (config, weights, embedded tokenizer, sampling defaults).

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
corrupt array count) sees it. Anything wrong is one ``GptsError`` line. numpy only (gguf-py for
the tensor views); no torch.
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gpts_edge.config import ModelConfig
from gpts_edge.constants import DEFAULT_GENERATION
from gpts_edge.errors import GptsError
from gpts_edge.names import checkpoint_name_from_gguf, expected_shapes

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
