"""Eval-set contamination: which training documents share a word n-gram with an eval item.

Normalisation (the same on both sides): the text is lowercased with ``str.lower``; every
character that is not a Unicode letter, digit or combining mark (categories L*, N*, M*) is a
separator, so punctuation, symbols, ``_`` and whitespace all split words (``don't`` -> ``don t``,
``well-known`` -> ``well known``); the words are the runs between separators. An n-gram is ``n``
consecutive words of one document (n-grams never cross documents) or of one eval text.

Eval texts, read with the readers of :mod:`gpts_edge.evaluate`: per choice, the item's context
joined to that choice as the model sees it, without the ``Question: ... Answer:`` template of PIQA
and ARC -- PIQA goal + solution, ARC question + choice, HellaSwag activity label and context +
ending, ``mc`` context + choice. The n-grams of a joined text include those of the context alone
and of the choice alone. An item whose texts are all shorter than ``n`` words cannot be matched
and is counted as ``short``.

Matching streams the documents: each document's n-grams are hashed (Python's ``hash`` of each
word, combined in numpy) and looked up in the sorted array of the eval n-gram hashes; every hash
hit is then confirmed word by word, so a reported overlap is never a hash collision.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gpts_edge.errors import GptsError
from gpts_edge.evaluate import READERS, TASKS, Item, resolve_task_file

NGRAM = 13
NORMALISATION = "lower; non-letter/digit/mark characters separate words (v1)"

_NON_ASCII = re.compile(r"[^\x00-\x7f]+")
# Bytes that are word characters after the non-ASCII pass: ASCII letters and digits, and every
# byte of a multi-byte UTF-8 character (only letters, digits and marks are left by then).
_ASCII_TABLE = bytes(c if (chr(c).isalnum() and c < 0x80) or c >= 0x80 else 0x20 for c in range(256))
_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd multiplier for combining word hashes into n-grams
# A presence table over the top bits of the eval hashes rejects most document n-grams with one
# gather, before the binary search (which costs ~20 random reads each) sees the rest.
_PREFILTER_BITS = 24
_PREFILTER_SHIFT = np.uint64(64 - _PREFILTER_BITS)


def _non_ascii_separators(m: re.Match[str]) -> str:
    return "".join(c if unicodedata.category(c)[0] in "LNM" else " " for c in m.group())


def normalized_words(text: str) -> list[bytes]:
    """The words of ``text`` under the module's normalisation, as UTF-8 bytes."""
    text = text.lower()
    if not text.isascii():  # rare characters only: the regex scan itself runs at C speed
        text = _NON_ASCII.sub(_non_ascii_separators, text)
    return text.encode("utf-8").translate(_ASCII_TABLE).split()


def ngram_hashes(words: list[bytes], n: int) -> np.ndarray:
    """uint64 hash of each n-gram of ``words`` (len(words) - n + 1 of them, or none).

    Valid within one process only (Python randomises ``hash`` of bytes per process)."""
    count = len(words) - n + 1
    if count <= 0:
        return np.empty(0, dtype=np.uint64)
    h = np.fromiter(map(hash, words), dtype=np.int64, count=len(words)).view(np.uint64)
    acc = h[:count].copy()
    with np.errstate(over="ignore"):  # arithmetic modulo 2**64 on purpose
        for k in range(1, n):
            acc *= _MIX
            acc += h[k : k + count]
    return acc


# --- the eval side -----------------------------------------------------------------------------


def _sniff_task(path: Path) -> str:
    """The task of one eval file, from its suffix or its first JSON object's fields."""
    if path.suffix == ".txt":
        return "hellaswag"
    try:
        with path.open(encoding="utf-8") as fh:
            first = next((line for line in fh if line.strip()), "")
    except (OSError, UnicodeDecodeError) as exc:
        raise GptsError(f"{path}: cannot read ({exc})") from None
    try:
        obj = json.loads(first) if first else None
    except json.JSONDecodeError as exc:
        raise GptsError(f"{path}:1: not valid JSON ({exc.msg})") from None
    if not isinstance(obj, dict):
        raise GptsError(f"{path}: expected JSON Lines of eval items, found {first[:60]!r}")
    arc = "arc_challenge" if "challenge" in path.name.lower() else "arc_easy"  # same reader
    for task, keys in (
        ("piqa", {"goal", "sol1"}),
        (arc, {"question", "choices"}),
        ("hellaswag", {"ctx_a", "endings"}),
        ("mc", {"context", "choices"}),
    ):
        if keys <= obj.keys():
            return task
    raise GptsError(
        f"{path}:1: not a known eval format: expected the fields of PIQA (goal, sol1, sol2), ARC "
        f"(question, choices), HellaSwag (ctx_a, endings) or mc (context, choices); "
        f"found {sorted(obj)}"
    )


def find_eval_files(spec: str | Path, option: str = "--against") -> list[tuple[str, Path]]:
    """(task, file) pairs of an eval folder (the layout of ``gpts-edge eval --data``) or one file."""
    path = Path(spec)
    if path.is_file():
        return [(_sniff_task(path), path)]
    if not path.is_dir():
        raise GptsError(f"{option} {spec}: no such file or folder")
    found = []
    for task in TASKS:
        try:
            found.append((task, resolve_task_file(task, path)))
        except GptsError:
            continue  # this task's file is not in the folder; the others may be
    if not found:
        raise GptsError(
            f"{option} {spec}: no eval file found (expected piqa/valid.jsonl, arc/arc_easy_test.jsonl, "
            "arc/arc_challenge_test.jsonl or hellaswag/hellaswag_val_full.txt, or a file)"
        )
    return found


def item_texts(item: Item) -> list[str]:
    """The texts of one item that are searched for: context + delimiter + choice, per choice."""
    context = item.context
    if context.startswith("Question: ") and context.endswith("\nAnswer:"):  # PIQA / ARC template
        context = context[len("Question: ") : -len("\nAnswer:")]
    return [context + item.delimiter + choice for choice in item.choices]


@dataclass(frozen=True)
class Match:
    """One confirmed overlap: the eval item (task and file:line) and the shared words."""

    task: str
    where: str
    ngram: str


@dataclass
class EvalIndex:
    """The n-grams of a set of eval files, ready for matching documents against."""

    n: int
    files: list[tuple[str, Path]]
    fingerprint: str  # identity of the eval set + n + normalisation; enters data-cache keys
    items: int = 0
    short_items: int = 0
    per_task: dict[str, int] = field(default_factory=dict)
    short_per_task: dict[str, int] = field(default_factory=dict)
    _hashes: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint64), repr=False)
    _refs: np.ndarray = field(default_factory=lambda: np.empty((0, 3), np.int64), repr=False)
    _present: np.ndarray = field(default_factory=lambda: np.zeros(1 << _PREFILTER_BITS, bool), repr=False)
    _texts: list[list[str]] = field(default_factory=list, repr=False)
    _items: list[tuple[str, str]] = field(default_factory=list, repr=False)

    @property
    def ngrams(self) -> int:
        """Distinct eval n-grams (the hashes are sorted)."""
        return int(np.count_nonzero(np.diff(self._hashes))) + 1 if len(self._hashes) else 0

    def summary(self) -> dict:
        return {
            "files": [{"task": t, "path": str(p)} for t, p in self.files],
            "n": self.n,
            "normalisation": NORMALISATION,
            "items": self.items,
            "short_items": self.short_items,
            "items_per_task": self.per_task,
            "short_items_per_task": self.short_per_task,
            "ngrams": self.ngrams,
            "fingerprint": self.fingerprint,
        }

    def matches(self, text: str, first_only: bool = False) -> list[Match]:
        """Confirmed eval n-grams in ``text`` (each distinct eval item once)."""
        words = normalized_words(text)
        hashes = ngram_hashes(words, self.n)
        if not len(hashes) or not len(self._hashes):
            return []
        maybe = np.flatnonzero(self._present[hashes >> _PREFILTER_SHIFT])
        if not len(maybe):
            return []
        pos = np.searchsorted(self._hashes, hashes[maybe])
        pos[pos == len(self._hashes)] = 0
        hit = self._hashes[pos] == hashes[maybe]
        out: list[Match] = []
        seen: set[int] = set()
        for i, k0 in zip(maybe[hit].tolist(), pos[hit].tolist(), strict=True):
            gram = words[i : i + self.n]
            k = k0
            while k < len(self._hashes) and self._hashes[k] == hashes[i]:
                item, text_no, start = self._refs[k].tolist()
                if item not in seen:
                    eval_words = normalized_words(self._texts[item][text_no])
                    if eval_words[start : start + self.n] == gram:  # rule out hash collisions
                        seen.add(item)
                        task, where = self._items[item]
                        out.append(Match(task, where, b" ".join(gram).decode("utf-8")))
                        if first_only:
                            return out
                k += 1
        return out

    def contaminated(self, text: str) -> bool:
        return bool(self.matches(text, first_only=True))


def _fingerprint(files: list[tuple[str, Path]], n: int) -> str:
    h = hashlib.sha256(json.dumps([NORMALISATION, n]).encode())
    for task, path in sorted(files, key=lambda tp: (tp[0], str(tp[1]))):
        h.update(task.encode())
        with path.open("rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def load_eval_index(
    against: list[str | Path] | str | Path, n: int = NGRAM, option: str = "--against"
) -> EvalIndex:
    """Read every eval file named (folders in the shared layout, or files) and index its n-grams;
    ``option`` names the command-line flag in error messages."""
    if isinstance(against, (str, Path)):
        against = [against]
    if not against:
        raise GptsError(f"{option}: give an eval folder or file")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise GptsError(f"--n: expected a whole number of words >= 1, found {n}")
    files: list[tuple[str, Path]] = []
    for spec in against:
        for task, path in find_eval_files(spec, option):
            if (task, path.resolve()) not in {(t, p.resolve()) for t, p in files}:
                files.append((task, path))
    index = EvalIndex(n=n, files=files, fingerprint=_fingerprint(files, n))
    hashes, refs = [], []
    for task, path in files:
        items = READERS[task](path)
        if not items:
            raise GptsError(f"{path}: no {task} items found")
        index.per_task[task] = index.per_task.get(task, 0) + len(items)
        for item in items:
            number = len(index._items)
            texts = item_texts(item)
            index._items.append((task, item.where))
            index._texts.append(texts)
            long_enough = False
            for text_no, text in enumerate(texts):
                h = ngram_hashes(normalized_words(text), n)
                if len(h):
                    long_enough = True
                    hashes.append(h)
                    refs.append(
                        np.stack(
                            [np.full(len(h), number), np.full(len(h), text_no), np.arange(len(h))], axis=1
                        )
                    )
            index.items += 1
            index.short_items += not long_enough
            index.short_per_task[task] = index.short_per_task.get(task, 0) + (not long_enough)
    if hashes:
        all_hashes = np.concatenate(hashes)
        order = np.argsort(all_hashes, kind="stable")
        index._hashes = all_hashes[order]
        index._refs = np.concatenate(refs)[order]
        index._present[index._hashes >> _PREFILTER_SHIFT] = True
    return index
