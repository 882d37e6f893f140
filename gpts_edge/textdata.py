"""Reading training text: plain text files, ``.jsonl`` / ``.jsonl.gz`` with a ``text`` field,
directories and globs. Used by tokenizer training and by the trainer's data preparation."""

from __future__ import annotations

import glob
import gzip
import json
from collections.abc import Iterator
from pathlib import Path

from gpts_edge.errors import GptsError

TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz", ".ndjson")


def expand_paths(spec: str | Path) -> list[Path]:
    """A file, a directory (its readable files, sorted) or a glob -> a sorted list of files."""
    spec = str(spec)
    if any(c in spec for c in "*?["):
        found = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        if not found:
            raise GptsError(f"--data {spec}: the pattern matches no file")
        return found
    path = Path(spec)
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and _readable(p))
        if not found:
            raise GptsError(f"--data {spec}: the directory holds no .txt/.jsonl/.jsonl.gz file")
        return found
    if path.is_file():
        if not _readable(path):
            raise GptsError(f"--data {spec}: unsupported file type (expected .txt, .md, .jsonl or .jsonl.gz)")
        return [path]
    raise GptsError(f"--data {spec}: no such file or directory")


def _readable(p: Path) -> bool:
    name = p.name.lower()
    return name.endswith(TEXT_SUFFIXES) or name.endswith(JSONL_SUFFIXES)


def iter_documents(path: Path) -> Iterator[str]:
    """Documents of one file: each JSON line's ``text``, or a whole text file as one document."""
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        opener = gzip.open if name.endswith(".gz") else open
        try:
            with opener(path, "rt", encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise GptsError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
                    text = obj.get("text") if isinstance(obj, dict) else None
                    if not isinstance(text, str):
                        raise GptsError(f"{path}:{lineno}: expected an object with a string field 'text'")
                    yield text
        except (OSError, EOFError, UnicodeDecodeError) as exc:
            raise GptsError(f"{path}: cannot read ({exc})") from None
    else:
        try:
            yield path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise GptsError(f"{path}: cannot read as UTF-8 text ({exc})") from None
