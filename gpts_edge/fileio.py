"""Writing files so that readers and crashes never see half of one: temp file or folder beside
the target, fsync, umask permissions, rename. Every writer (checkpoint, tokenizer, ONNX, ORT,
GGUF, HF) goes through these, and checks its output folder first with ``require_output_dir``."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gpts_edge.errors import GptsError


def require_output_dir(parent: Path) -> None:
    """The folder an output goes into must exist, be a folder and be writable (checked before
    any work, so the error names the folder rather than a temp file deep inside a write)."""
    if not parent.exists():
        raise GptsError(f"{parent}: output directory does not exist")
    if not parent.is_dir():
        raise GptsError(f"{parent}: output location is not a directory")
    if not os.access(parent, os.W_OK):
        raise GptsError(f"{parent}: output directory is not writable")


def temp_dir_beside(out: Path) -> Path:
    """A new hidden folder next to ``out`` named ``.NAME.tmp-pPID-…``: the one naming that
    outputs.clean_stale reads to remove what a killed writer left behind."""
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-p{os.getpid()}-", dir=out.parent))


@contextmanager
def atomic_dir(out: Path, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary directory beside ``out``; on success its files are synced and it is
    renamed to ``out`` (replacing an old one), on any error or Ctrl-C it is removed."""
    # The process id in the name tells a later writer whether this temp folder is stale.
    tmp = temp_dir_beside(out)
    try:
        # mkdtemp's 0700 would make a model folder private; honour the umask instead.
        os.chmod(tmp, umask_mode(0o777) if mode is None else mode)
        yield tmp
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary file path beside ``path``; on success it is synced, given the usual
    umask mode and renamed to ``path``; on any error or Ctrl-C it is removed. Readers see the
    old file or the new one, never a half-written one."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.p{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        # mkstemp creates 0600; an export is meant to be shared.
        os.chmod(tmp, umask_mode(0o666))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def umask_mode(base: int) -> int:
    umask = os.umask(0)
    os.umask(umask)
    return base & ~umask


def replace_dir(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``; an existing ``target`` is swapped out first, then removed.
    There is always one complete directory at ``target`` or at its ``.old`` side name."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.rename(target, old)
        os.rename(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(new, target)


def cache_root() -> Path:
    """The user cache of exports and distilled weights: $XDG_CACHE_HOME/gpts-edge (default
    ~/.cache/gpts-edge). Nothing in it is needed: each entry is rebuilt when missing."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gpts-edge"


def hash_file(path: Path, h: Any = None) -> Any:
    """Feed ``path`` into the hash ``h`` (default: a new sha256) in 1 MiB chunks and return it;
    an unreadable file is one error line naming it."""
    h = hashlib.sha256() if h is None else h
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    except OSError as exc:
        raise unreadable(path, exc) from None
    return h


def unreadable(path: Path, exc: OSError) -> GptsError:
    """The one-line error for a file or folder that exists but cannot be read (permissions, an
    I/O error): it names the path, so it is never mistaken for a missing file."""
    return GptsError(f"{path}: cannot read ({exc.strerror or exc})")


def check_readable(path: Path) -> None:
    """Open ``path`` for reading once (a folder: list it), so a permission problem is reported
    as such, naming the path, before a library reports it as something else."""
    try:
        if path.is_dir():
            next(os.scandir(path), None)
        else:
            with open(path, "rb"):
                pass
    except OSError as exc:
        raise unreadable(path, exc) from None


def read_text(path: Path) -> str:
    """``path``'s text (UTF-8); an unreadable file is a GptsError naming it."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise unreadable(path, exc) from None
