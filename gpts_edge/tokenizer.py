"""Byte-level BPE tokenizer (the `tokenizers` library): train, load, encode, decode.

``<|endoftext|>`` is id 0 and separates documents. Byte-level pre-tokenization with no normalizer
means any UTF-8 string round-trips exactly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from gpts_edge.errors import GptsError
from gpts_edge.fileio import check_readable

EOT = "<|endoftext|>"
EOT_ID = 0


# Every byte plus <|endoftext|>: the smallest byte-level vocabulary.
MIN_VOCAB = 257
MAX_VOCAB = 1 << 20


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096) -> Tokenizer:
    if not MIN_VOCAB <= vocab_size <= MAX_VOCAB:
        raise GptsError(
            f"--vocab-size: expected {MIN_VOCAB:,}..{MAX_VOCAB:,} (256 bytes + {EOT} at least), found {vocab_size}"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        raise GptsError(
            f"tokenizer training produced {tok.get_vocab_size()} tokens, expected {vocab_size} "
            "(the training text is too small for this vocabulary)"
        )
    if tok.token_to_id(EOT) != EOT_ID:
        raise GptsError(f"tokenizer: {EOT} must be id {EOT_ID}")
    return tok


def _is_tokenizer_json(path: Path) -> bool:
    try:
        Tokenizer.from_file(str(path))
    except Exception:  # tokenizers raises a bare Exception on anything it cannot read
        return False
    return True


def check_tokenizer_output(path: Path, *, force: bool = False) -> Path:
    """A .json path that is new or a tokenizer.json (anything, with ``force``): checked before
    training, so a bad -o fails in a second, not after the training run."""
    from gpts_edge.outputs import check_output_file

    return check_output_file(
        path, ".json", force=force, same_format=_is_tokenizer_json, what="tokenizers tokenizer.json"
    )


def save_tokenizer(tok: Tokenizer, path: Path, *, force: bool = False) -> None:
    """Atomic write: a temp file beside ``path``, then rename (a failed save leaves no temp file)."""
    from gpts_edge.fileio import atomic_file

    check_tokenizer_output(path, force=force)
    with atomic_file(path) as tmp:
        tok.save(str(tmp))


def load_tokenizer(path: str | Path, vocab_size: int | None = None) -> Tokenizer:
    """Load ``tokenizer.json``; with ``vocab_size``, check it matches the model's vocabulary."""
    path = Path(path)
    if not path.is_file():
        raise GptsError(f"{path}: file not found (expected a tokenizers tokenizer.json)")
    check_readable(path)
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed files
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise GptsError(f"{path}: not a valid tokenizer.json ({first})") from None
    if vocab_size is not None and tok.get_vocab_size() != vocab_size:
        raise GptsError(
            f"{path}: vocabulary size: expected {vocab_size} (from config.json), found {tok.get_vocab_size()}"
        )
    if tok.token_to_id(EOT) != EOT_ID:
        raise GptsError(f"{path}: expected {EOT} at id {EOT_ID}, found {tok.token_to_id(EOT)}")
    return tok


def tokenizer_hash(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _byte_level_table() -> dict[str, int]:
    """The ByteLevel alphabet (GPT-2's bytes_to_unicode), character -> byte: printable Latin-1
    bytes stand for themselves, the other 68 bytes for the characters from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


_BYTE_OF = _byte_level_table()


class StreamDecoder:
    """Turns a growing token list into text pieces without splitting a UTF-8 character.

    A piece is emitted as soon as the text so far does not end in U+FFFD (an unfinished
    character, or invalid bytes that the next token may still resolve); the pieces join to
    exactly ``tok.decode(ids, skip_special_tokens=False)``. Incremental: only the tokens since
    the last piece are decoded (as bytes, for a byte-level tokenizer), so a step costs the same at
    token 8,000 as at token 1. The JavaScript port (examples/web) emits the same pieces."""

    def __init__(self, tok: Tokenizer, byte_cache: dict[int, bytes] | None = None) -> None:
        self.tok = tok
        self._byte_level = isinstance(tok.decoder, decoders.ByteLevel)
        self._special = {i: t.content for i, t in tok.get_added_tokens_decoder().items()}
        # Each token's bytes, filled as tokens appear; a server shares one among its requests
        # (``byte_cache``, for this tokenizer only) so a request does not start from nothing.
        self._bytes: dict[int, bytes] = {} if byte_cache is None else byte_cache
        self._ids: list[int] = []  # tokens since the last piece
        self._pending = b""  # their bytes (byte-level tokenizers)

    def _token_bytes(self, token_id: int) -> bytes:
        data = self._bytes.get(token_id)
        if data is None:
            if token_id in self._special:
                data = self._special[token_id].encode("utf-8")
            else:
                piece = self.tok.id_to_token(token_id)
                if piece is None:
                    raise GptsError(f"token id {token_id} is outside the vocabulary")
                # A character outside the alphabet cannot occur in a byte-level vocabulary.
                data = bytes(_BYTE_OF[c] for c in piece)
            self._bytes[token_id] = data
        return data

    def _text(self) -> str:
        if self._byte_level:
            return self._pending.decode("utf-8", errors="replace")
        return self.tok.decode(self._ids, skip_special_tokens=False)

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        if self._byte_level:
            self._pending += self._token_bytes(token_id)
        text = self._text()
        if text.endswith("\ufffd"):  # maybe an unfinished character: wait for the next token
            return ""
        # The text ends in a whole character, so the decoder starts afresh after it.
        self._ids, self._pending = [], b""
        return text

    def flush(self) -> str:
        """What is still held back at the end of the stream (U+FFFD for bytes that never
        completed a character)."""
        text = self._text() if self._ids else ""
        self._ids, self._pending = [], b""
        return text


def iter_texts(paths: Iterable[Path]) -> Iterator[str]:
    from gpts_edge.textdata import iter_documents

    for p in paths:
        yield from iter_documents(p)
