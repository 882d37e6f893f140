"""The overwrite rules every writer follows (export onnx/ort/gguf/hf, import gguf/hf, tokenizer
train), so that no user file is ever deleted and a kill never leaves half an export:

- a folder output may be new, empty, or a previous export of the same kind (it holds the kind's
  key file and only files that kind writes); anything else is refused, naming the folder, unless
  ``force``, which replaces only the files the export owns and keeps every other entry;
- the current folder, a folder above it and ``/`` are never an output folder;
- a folder export is written into a hidden sibling folder and swapped in whole (the old one moves
  aside, then is removed), so readers see the old export or the new one;
- a file output needs the format's suffix (unless ``force``) and replaces only a file of the same
  format (unless ``force``);
- hidden temp files and folders left by a killed writer at the same place are removed on the next
  write there (those of a process still running are left alone).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from gpts_edge.constants import (
    CONFIG_FILE,
    DECODE_SUFFIX,
    GENAI_FILE,
    GENERATION_FILE,
    LAST_LOGITS_SUFFIX,
    ONNX_MODEL_FILE,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    flavour_file,
)
from gpts_edge.errors import GptsError
from gpts_edge.fileio import atomic_dir, require_output_dir

# A temp entry without a process id in its name is stale after this long (writers of this
# model take seconds to minutes).
STALE_AFTER_S = 3600.0


@dataclass(frozen=True)
class FolderKind:
    """What a folder export of one kind holds: ``key`` marks a previous export; ``owned`` are the
    names (files or sub-folders) it writes, which ``force`` may replace."""

    name: str
    key: str
    owned: frozenset[str]

    def foreign(self, folder: Path) -> list[str]:
        # Every other entry is the user's, hidden ones included: our temp entries live beside
        # the folder, never in it.
        return sorted(p.name for p in folder.iterdir() if p.name not in self.owned)


_SIDECARS = (CONFIG_FILE, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, GENERATION_FILE, GENAI_FILE)
CHECKPOINT_KIND = FolderKind(
    "checkpoint", WEIGHTS_FILE, frozenset((CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE, GENERATION_FILE))
)


def onnx_files(model_file: str = ONNX_MODEL_FILE) -> frozenset[str]:
    """Every file an ONNX export named ``model_file`` writes (graph, its flavours, sidecars)."""
    flavours = (flavour_file(model_file, DECODE_SUFFIX), flavour_file(model_file, LAST_LOGITS_SUFFIX))
    return frozenset((model_file, *flavours, *_SIDECARS))


ONNX_KIND = FolderKind("ONNX export", ONNX_MODEL_FILE, onnx_files())


# What follows ".NAME." in our temp names: mkdtemp/mkstemp's 8 random characters, after the
# writer's process id (p1234) in current names; old-1234 is a swapped-out folder.
_TEMP_NAME = re.compile(
    r"^(?:(?:tmp|tok)-(?:p(?P<a>\d+)-)?[a-z0-9_]{8}|old-(?P<b>\d+)|(?:p(?P<c>\d+)\.)?[a-z0-9_]{8}\.tmp)$"
)


def check_not_enclosing(out: Path) -> Path:
    """``out`` resolved; the current folder, one above it or the root is refused (swapping it out
    would take the user's other files, and the shell's working folder, with it)."""
    resolved = out.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents or resolved.parent == resolved:
        where = "the current folder" if resolved == cwd else "a folder that holds the current folder"
        raise GptsError(f"{out}: is {where}; give the export a folder of its own (e.g. {out}/export)")
    return resolved


def check_output_dir(out: Path, kind: FolderKind, *, force: bool) -> None:
    """Refuse ``out`` unless it is new, empty, a previous export of ``kind``, or ``force``."""
    check_not_enclosing(out)
    if out.exists() and not out.is_dir():
        raise GptsError(f"{out}: exists and is not a folder (a {kind.name} is a folder)")
    require_output_dir(out.parent)
    if not out.is_dir() or force:
        return
    if not any(out.iterdir()):
        return
    if not (out / kind.key).exists():
        raise GptsError(
            f"{out}: folder is not empty and is not a previous {kind.name} (no {kind.key}); refusing to "
            "replace it: choose a new or empty folder, or pass --force to replace only the export's files"
        )
    foreign = kind.foreign(out)
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise GptsError(
            f"{out}: folder holds files that are not part of a {kind.name} ({', '.join(foreign[:3])}{more}); "
            "refusing to replace it: pass --force to replace only the export's files and keep these"
        )


@contextmanager
def export_folder(out: str | Path, kind: FolderKind, *, force: bool = False) -> Iterator[Path]:
    """Yield a hidden sibling folder to write the export into; on success the entries of ``out``
    that the export does not own are hard-linked into it (``force`` only: otherwise there are
    none) and it replaces ``out`` in one swap. On any error ``out`` is untouched."""
    out = Path(out)
    check_output_dir(out, kind, force=force)
    clean_stale(out)
    # A folder being replaced keeps its permissions (a private folder stays private).
    mode = out.stat().st_mode & 0o7777 if out.is_dir() else None
    with atomic_dir(out, mode) as tmp:
        yield tmp
        if out.is_dir():
            for name in kind.foreign(out):
                if not (tmp / name).exists():
                    _link_tree(out / name, tmp / name)


def _link_tree(src: Path, dst: Path) -> None:
    """Carry a user's entry into the new folder without copying data (hard links; a copy where
    links are impossible). The old folder keeps its own links until the swap is done."""

    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        shutil.copytree(src, dst, symlinks=True, copy_function=link)
    else:
        link(str(src), str(dst))


def check_output_file(
    out: str | Path, suffix: str, *, force: bool, same_format: Callable[[Path], bool], what: str
) -> Path:
    """A file output: the format's ``suffix`` and, when it exists, a file of the same format
    (``same_format``), unless ``force``. Also cleans stale temp files beside it."""
    out = Path(out)
    if out.is_dir():
        raise GptsError(f"{out}: is a folder (expected a {suffix} file path)")
    if out.suffix != suffix and not force:
        raise GptsError(f"{out}: expected a file name ending in {suffix} (or pass --force)")
    require_output_dir(out.parent)
    if out.exists() and not force and not same_format(out):
        raise GptsError(f"{out}: exists and is not a {what}; refusing to overwrite it (pass --force)")
    clean_stale(out)
    return out


def file_starts_with(magic: bytes) -> Callable[[Path], bool]:
    def check(path: Path) -> bool:
        try:
            with open(path, "rb") as fh:
                return fh.read(len(magic)) == magic
        except OSError:
            return False

    return check


def clean_stale(target: Path) -> list[Path]:
    """Remove hidden temp entries that killed writers left beside ``target`` (``.NAME.tmp-*``,
    ``.NAME.*.tmp``, ``.NAME.tok-*``, ``.NAME.old-PID``). An entry naming a live process is
    kept; one without a process id is removed once older than STALE_AFTER_S. A swapped-out old
    folder is put back when the kill came between the two renames of a swap."""
    parent, name = target.parent, target.name
    removed: list[Path] = []
    try:
        entries = [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]
    except OSError:
        return removed
    for p in entries:
        m = _TEMP_NAME.match(p.name[len(name) + 2 :])
        if m is None:
            continue
        pid = m.group("a") or m.group("b") or m.group("c")
        if not _stale(p, None if pid is None else int(pid)):
            continue
        if m.group("b") and not target.exists():
            try:
                os.rename(p, target)  # the new one never arrived: the old export comes back
                continue
            except OSError:
                pass
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _stale(p: Path, pid: int | None) -> bool:
    if pid is not None:
        return pid != os.getpid() and not _alive(pid)
    try:
        return time.time() - p.lstat().st_mtime > STALE_AFTER_S
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True
