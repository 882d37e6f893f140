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

EOT = "<|endoftext|>"
EOT_ID = 0


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096) -> Tokenizer:
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


def save_tokenizer(tok: Tokenizer, path: Path) -> None:
    """Atomic write: a temp file beside ``path``, then rename (a failed save leaves no temp file)."""
    from gpts_edge.fileio import atomic_file, require_output_dir

    require_output_dir(path.parent)
    with atomic_file(path) as tmp:
        tok.save(str(tmp))


def load_tokenizer(path: str | Path, vocab_size: int | None = None) -> Tokenizer:
    """Load ``tokenizer.json``; with ``vocab_size``, check it matches the model's vocabulary."""
    path = Path(path)
    if not path.is_file():
        raise GptsError(f"{path}: file not found (expected a tokenizers tokenizer.json)")
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


class StreamDecoder:
    """Turns a growing token list into text pieces without splitting a UTF-8 character."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids, skip_special_tokens=False)
        if text.endswith("\ufffd"):  # incomplete multi-byte character: wait for the next token
            return ""
        piece, self.emitted = text[len(self.emitted) :], text
        return piece

    def flush(self) -> str:
        """What is still held back at the end of the stream (a real trailing U+FFFD, or the
        replacement for bytes that never completed a character)."""
        text = self.tok.decode(self.ids, skip_special_tokens=False)
        piece, self.emitted = text[len(self.emitted) :], text
        return piece


def iter_texts(paths: Iterable[Path]) -> Iterator[str]:
    from gpts_edge.textdata import iter_documents

    for p in paths:
        yield from iter_documents(p)
