"""Zero-shot multiple-choice evaluation (HellaSwag, ARC, PIQA, generic JSON Lines) on any runtime.

Scoring follows lm-evaluation-harness's ``multiple_choice`` output type: each choice becomes the
continuation ``" " + choice`` of a task-specific context, its score is the summed log-probability
of the continuation tokens, and

* ``acc``        picks the highest sum,
* ``acc_norm``   the highest sum divided by the choice's length in characters (no leading space),
* ``acc_bytes``  the highest sum divided by the choice's UTF-8 length in bytes.

Only ``runtime.forward_logits(input_ids[B, T], attention_mask[B, T]) -> logits[B, T, V]`` is used,
so every runtime (torch, ONNX, GGUF) is scored by this same code. Numpy only: no torch import.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gpts_edge.errors import GptsError
from gpts_edge.tokenizer import EOT_ID

TASKS = ("hellaswag", "arc_easy", "arc_challenge", "piqa")
ALL_TASKS = (*TASKS, "mc")
RANDOM_CHANCE = {"hellaswag": 25.0, "arc_easy": 25.0, "arc_challenge": 25.0, "piqa": 50.0}

# Where each task's file lies inside an eval data folder (the layout of shared/data/eval/);
# the first match wins.
_DEFAULT_FILES = {
    "piqa": ("valid.jsonl", "piqa/valid.jsonl"),
    "hellaswag": (
        "hellaswag_val_full.txt",
        "hellaswag/hellaswag_val_full.txt",
        "hellaswag_val.jsonl",
        "hellaswag/hellaswag_val.jsonl",
    ),
    "arc_easy": ("arc_easy_test.jsonl", "arc/arc_easy_test.jsonl"),
    "arc_challenge": ("arc_challenge_test.jsonl", "arc/arc_challenge_test.jsonl"),
}


@dataclass(frozen=True)
class Item:
    """One question: the context, the choice texts (without the delimiter) and the gold index."""

    context: str
    choices: tuple[str, ...]
    gold: int
    where: str  # "file:line", for error messages
    delimiter: str = " "


# --- readers ---------------------------------------------------------------------------------


def _json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        fh = path.open(encoding="utf-8")
    except OSError as exc:
        raise GptsError(f"{path}: cannot read ({exc.strerror})") from None
    with fh:
        try:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise GptsError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
                if not isinstance(obj, dict):
                    raise GptsError(f"{path}:{lineno}: expected a JSON object, found {type(obj).__name__}")
                yield lineno, obj
        except UnicodeDecodeError:
            raise GptsError(f"{path}: not UTF-8 text") from None


def _field(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in obj:
        raise GptsError(f"{where}: missing field {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise GptsError(f"{where}: field {key!r}: expected {names}, found {type(value).__name__}")
    return value


def _choices(value: Any, where: str, key: str = "choices") -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) < 2 or not all(isinstance(c, str) for c in value):
        raise GptsError(f"{where}: field {key!r}: expected a list of at least 2 strings, found {value!r:.80}")
    return tuple(value)


def _gold(value: Any, n: int, where: str, key: str = "answer") -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < n:
        raise GptsError(f"{where}: field {key!r}: expected an index in 0..{n - 1}, found {value!r}")
    return value


def read_piqa(path: str | Path, labels: str | Path | None = None) -> list[Item]:
    """PIQA's original release: ``{goal, sol1, sol2}`` lines plus a labels file of 0/1 lines
    (default: ``valid.jsonl`` -> ``valid-labels.lst`` beside it)."""
    path = Path(path)
    labels = Path(labels) if labels else path.with_name(path.name.removesuffix(".jsonl") + "-labels.lst")
    if not labels.is_file():
        raise GptsError(
            f"{labels}: PIQA labels file not found (one 0/1 label a line, aligned with {path.name})"
        )
    gold_lines = [(i, s.strip()) for i, s in enumerate(labels.read_text(encoding="utf-8").splitlines(), 1)]
    gold_lines = [(i, s) for i, s in gold_lines if s]
    rows = list(_json_lines(path))
    if len(rows) != len(gold_lines):
        raise GptsError(
            f"{labels}: expected {len(rows)} labels (one per item of {path.name}), found {len(gold_lines)}"
        )
    items = []
    for (lineno, obj), (label_line, label) in zip(rows, gold_lines, strict=True):
        where = f"{path}:{lineno}"
        goal = _field(obj, "goal", str, where)
        sols = (_field(obj, "sol1", str, where), _field(obj, "sol2", str, where))
        if label not in ("0", "1"):
            raise GptsError(f"{labels}:{label_line}: expected label 0 or 1, found {label!r}")
        items.append(Item(f"Question: {goal}\nAnswer:", sols, int(label), where))
    return items


def hellaswag_preprocess(text: str) -> str:
    """lm-evaluation-harness's clean-up of HellaSwag text (WikiHow markers)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


# The last clause of an ActivityNet context (ctx_b) follows a sentence end or the label's colon.
_LAST_CLAUSE = re.compile(r"^(.*(?:[.!?:]) )([a-z][^.!?]*)$", re.DOTALL)


def hellaswag_capitalize_last_clause(line: str) -> str:
    """Rebuild the harness's ``ctx_b.capitalize()`` on a context line that joined ``ctx_a`` and
    ``ctx_b`` without it: a trailing clause that starts in lower case after a sentence end is
    taken to be ``ctx_b`` and capitalised (str.capitalize, as the harness does)."""
    m = _LAST_CLAUSE.match(line)
    return line if m is None else m.group(1) + m.group(2).capitalize()


def read_hellaswag(path: str | Path) -> list[Item]:
    """HellaSwag as the original ``hellaswag_val.jsonl`` (exact harness query) or llama.cpp's
    6-line text format (label: ctx / gold / 4 endings; ctx_b recapitalised, see docs/eval.md)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        items = []
        for lineno, obj in _json_lines(path):
            where = f"{path}:{lineno}"
            ctx = (
                _field(obj, "activity_label", str, where)
                + ": "
                + _field(obj, "ctx_a", str, where)
                + " "
                + _field(obj, "ctx_b", str, where).capitalize()
            )
            endings = _choices(obj.get("endings"), where, "endings")
            label = obj.get("label")
            if isinstance(label, str) and label.isdigit():
                label = int(label)
            items.append(
                Item(
                    hellaswag_preprocess(ctx),
                    tuple(hellaswag_preprocess(e) for e in endings),
                    _gold(label, len(endings), where, "label"),
                    where,
                )
            )
        return items
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except OSError as exc:
        raise GptsError(f"{path}: cannot read ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise GptsError(f"{path}: not UTF-8 text") from None
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) % 6:
        raise GptsError(
            f"{path}: expected 6 lines per item (context, gold index, 4 endings), "
            f"found {len(lines)} lines (not a multiple of 6)"
        )
    items = []
    for start in range(0, len(lines), 6):
        where = f"{path}:{start + 1}"
        ctx, gold, *endings = (s.rstrip("\r") for s in lines[start : start + 6])
        if not gold.strip().isdigit() or not 0 <= int(gold) < 4:
            raise GptsError(f"{path}:{start + 2}: expected the gold ending index 0..3, found {gold!r:.60}")
        if not ctx.strip() or not all(e.strip() for e in endings):
            raise GptsError(f"{where}: empty context or ending in this 6-line item")
        items.append(
            Item(
                hellaswag_capitalize_last_clause(hellaswag_preprocess(ctx)),
                tuple(hellaswag_preprocess(e) for e in endings),
                int(gold),
                where,
            )
        )
    return items


def read_arc(path: str | Path) -> list[Item]:
    """ARC JSON Lines: ``question``, ``choices`` (list of strings, 3 to 5) and ``answer`` (index);
    the Hugging Face layout (``choices: {text, label}``, ``answerKey``) is read as well."""
    path = Path(path)
    items = []
    for lineno, obj in _json_lines(path):
        where = f"{path}:{lineno}"
        question = _field(obj, "question", str, where)
        raw = obj.get("choices")
        if isinstance(raw, dict):  # HF allenai/ai2_arc rows
            choices = _choices(raw.get("text"), where, "choices.text")
            labels = raw.get("label")
            key = obj.get("answerKey")
            if not isinstance(labels, list) or key not in labels:
                raise GptsError(f"{where}: field 'answerKey': expected one of {labels!r}, found {key!r}")
            gold = labels.index(key)
        else:
            choices = _choices(raw, where)
            gold = _gold(obj.get("answer"), len(choices), where)
        items.append(Item(f"Question: {question}\nAnswer:", choices, gold, where))
    return items


def read_mc(path: str | Path) -> list[Item]:
    """Generic multiple choice, one JSON object a line: ``{"context": str, "choices": [str, ...],
    "answer": int}``; optional ``"delimiter"`` (default ``" "``) goes between context and choice."""
    path = Path(path)
    items = []
    for lineno, obj in _json_lines(path):
        where = f"{path}:{lineno}"
        context = _field(obj, "context", str, where)
        choices = _choices(obj.get("choices"), where)
        delimiter = obj.get("delimiter", " ")
        if not isinstance(delimiter, str):
            raise GptsError(
                f"{where}: field 'delimiter': expected a string, found {type(delimiter).__name__}"
            )
        if not all(delimiter + c for c in choices):
            raise GptsError(f"{where}: field 'choices': a choice is empty (nothing to score)")
        items.append(Item(context, choices, _gold(obj.get("answer"), len(choices), where), where, delimiter))
    return items


READERS: dict[str, Callable[[Path], list[Item]]] = {
    "piqa": read_piqa,
    "hellaswag": read_hellaswag,
    "arc_easy": read_arc,
    "arc_challenge": read_arc,
    "mc": read_mc,
}


def resolve_task_file(task: str, data: str | Path) -> Path:
    """``data`` is the task's file, or a folder holding it (directly or in the shared layout)."""
    data = Path(data)
    if data.is_file():
        return data
    if not data.is_dir():
        raise GptsError(f"--data {data}: no such file or folder")
    if task == "mc":
        raise GptsError(f"--data {data}: --task mc needs a JSON Lines file, found a folder")
    for rel in _DEFAULT_FILES[task]:
        if (data / rel).is_file():
            return data / rel
    raise GptsError(f"--data {data}: no {task} file found (looked for {', '.join(_DEFAULT_FILES[task])})")


def load_task(task: str, data: str | Path) -> list[Item]:
    if task not in READERS:
        raise GptsError(f"--task: unknown task {task!r}; choose from {', '.join(ALL_TASKS)}, all")
    items = READERS[task](resolve_task_file(task, data))
    if not items:
        raise GptsError(f"--data {data}: no {task} items found")
    return items


# --- scoring ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Request:
    item: int
    tokens: np.ndarray  # the model input: (context + continuation)[:-1], its end kept
    continuation: np.ndarray  # token ids scored, predicted by the last len() positions


def encode_choice(
    tokenizer: Any, context: str, continuation: str, context_length: int, where: str = ""
) -> tuple[np.ndarray, np.ndarray]:
    """(model input, continuation ids) for one choice, as the harness does it: trailing spaces
    of the context move into the continuation, the whole string is encoded once and the
    continuation is what follows the context's own encoding; an empty context becomes
    ``<|endoftext|>``. The input keeps its last ``context_length`` tokens."""
    n_spaces = len(context) - len(context.rstrip(" "))
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    cont_alone = tokenizer.encode(continuation).ids
    if context:
        ctx_ids = tokenizer.encode(context).ids
        whole = tokenizer.encode(context + continuation).ids
        # A merge across the boundary would make the split ambiguous: fall back to separate encodings.
        cont_ids = whole[len(ctx_ids) :] if whole[: len(ctx_ids)] == ctx_ids else cont_alone
        if not cont_ids:
            cont_ids = cont_alone
    else:
        ctx_ids, cont_ids = [EOT_ID], cont_alone
    if not cont_ids:
        raise GptsError(f"{where}: a choice encodes to no tokens (nothing to score)")
    if len(cont_ids) > context_length:
        raise GptsError(
            f"{where}: a choice is {len(cont_ids)} tokens, longer than the model's context "
            f"length {context_length}"
        )
    seq = (ctx_ids + cont_ids)[-(context_length + 1) :][:-1]
    return np.asarray(seq, dtype=np.int64), np.asarray(cont_ids, dtype=np.int64)


def _log_softmax_rows(rows: np.ndarray) -> np.ndarray:
    x = rows.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))


def score_batch(runtime: Any, requests: Sequence[_Request]) -> np.ndarray:
    """Summed continuation log-probabilities (float64) for requests run as one left-padded forward."""
    T = max(len(r.tokens) for r in requests)
    ids = np.zeros((len(requests), T), dtype=np.int64)
    mask = np.zeros((len(requests), T), dtype=np.int64)
    for b, r in enumerate(requests):
        ids[b, T - len(r.tokens) :] = r.tokens
        mask[b, T - len(r.tokens) :] = 1
    logits = np.asarray(runtime.forward_logits(ids, mask))
    if logits.ndim != 3 or logits.shape[:2] != ids.shape:
        raise GptsError(
            f"runtime forward_logits: expected logits of shape ({len(requests)}, {T}, vocab), "
            f"found {logits.shape}"
        )
    # Only the rows that predict continuation tokens go through float64 log_softmax: the full
    # (B, T, V) tensor would cost far more than the forward itself.
    rows = np.concatenate([np.full(len(r.continuation), b) for b, r in enumerate(requests)])
    cols = np.concatenate([np.arange(T - len(r.continuation), T) for r in requests])
    targets = np.concatenate([r.continuation for r in requests])
    logp = _log_softmax_rows(logits[rows, cols])[np.arange(len(targets)), targets]
    starts = np.cumsum([0] + [len(r.continuation) for r in requests[:-1]])
    return np.add.reduceat(logp, starts)


@dataclass
class ItemScore:
    loglik: np.ndarray  # per choice
    gold: int
    chars: np.ndarray
    bytes: np.ndarray

    @property
    def pred(self) -> int:
        return int(np.argmax(self.loglik))

    @property
    def pred_norm(self) -> int:
        return int(np.argmax(self.loglik / self.chars))

    @property
    def pred_bytes(self) -> int:
        return int(np.argmax(self.loglik / self.bytes))


def score_items(
    runtime: Any,
    items: Sequence[Item],
    *,
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> list[ItemScore]:
    """Log-likelihood of every choice of every item; ``batch_size`` items (all their choices)
    share one forward call. Items are run longest first so a batch holds similar lengths."""
    if batch_size < 1:
        raise GptsError(f"--batch-size: expected a positive integer, found {batch_size}")
    if not hasattr(runtime, "forward_logits"):
        raise GptsError(f"runtime {type(runtime).__name__} has no forward_logits: it cannot score")
    tok, L = runtime.tokenizer, runtime.config.context_length
    per_item: list[list[_Request]] = []
    for i, it in enumerate(items):
        reqs = []
        for c in it.choices:
            inp, cont = encode_choice(tok, it.context, it.delimiter + c, L, it.where)
            reqs.append(_Request(i, inp, cont))
        per_item.append(reqs)
    order = sorted(range(len(items)), key=lambda i: -max(len(r.tokens) for r in per_item[i]))
    logliks: list[np.ndarray | None] = [None] * len(items)
    done = 0
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        reqs = [r for i in chunk for r in per_item[i]]
        scores = score_batch(runtime, reqs)
        k = 0
        for i in chunk:
            n = len(per_item[i])
            logliks[i] = scores[k : k + n]
            k += n
        done += len(chunk)
        if progress:
            progress(done, len(items))
    out = []
    for it, ll in zip(items, logliks, strict=True):
        chars = np.array([max(len(c), 1) for c in it.choices], dtype=np.float64)
        nbytes = np.array([max(len(c.encode("utf-8")), 1) for c in it.choices], dtype=np.float64)
        out.append(ItemScore(ll, it.gold, chars, nbytes))
    return out


def _pct_stderr(hits: np.ndarray) -> tuple[float, float]:
    n = len(hits)
    p = float(hits.mean())
    se = math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else 0.0
    return round(100 * p, 2), round(100 * se, 2)


def summarize(scores: Sequence[ItemScore]) -> dict[str, Any]:
    """acc, acc_norm, acc_bytes in percent (with the sample standard error), and n."""
    out: dict[str, Any] = {}
    for name, attr in (("acc", "pred"), ("acc_norm", "pred_norm"), ("acc_bytes", "pred_bytes")):
        hits = np.array([getattr(s, attr) == s.gold for s in scores], dtype=np.float64)
        out[name], out[f"{name}_stderr"] = _pct_stderr(hits)
    out["n"] = len(scores)
    return out


class Progress:
    """``task: done/total items, items/s`` on stderr: redrawn in place on a terminal, a line
    every 10% or 30 s otherwise (logs stay readable)."""

    def __init__(self, task: str, stream: Any = None) -> None:
        self.task, self.stream = task, stream or sys.stderr
        self.t0 = time.perf_counter()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.last_draw, self.last_decile = 0.0, -1

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        rate = done / max(now - self.t0, 1e-9)
        msg = f"{self.task}: {done}/{total} items, {rate:.1f} items/s"
        if self.tty:
            if now - self.last_draw > 0.2 or done == total:
                self.stream.write("\r" + msg + ("\n" if done == total else ""))
                self.stream.flush()
                self.last_draw = now
        elif (decile := 10 * done // total) != self.last_decile or now - self.last_draw > 30:
            self.last_decile, self.last_draw = decile, now
            self.stream.write(msg + "\n")
            self.stream.flush()


def evaluate(
    runtime: Any,
    tasks: Sequence[str],
    data: str | Path,
    *,
    limit: int | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Score each task on ``runtime``; the first ``limit`` items of each file when given."""
    if limit is not None and limit < 1:
        raise GptsError(f"--limit: expected a positive integer, found {limit}")
    loaded = {task: load_task(task, data) for task in tasks}  # every file checked before any scoring
    results = {}
    for task, items in loaded.items():
        items = items[:limit] if limit else items
        t0 = time.perf_counter()
        scores = score_items(
            runtime, items, batch_size=batch_size, progress=Progress(task) if progress else None
        )
        seconds = time.perf_counter() - t0
        results[task] = summarize(scores) | {
            "seconds": round(seconds, 1),
            "items_per_s": round(len(items) / max(seconds, 1e-9), 1),
        }
    return results


def expand_tasks(task: str) -> list[str]:
    if task == "all":
        return list(TASKS)
    names = [t.strip() for t in task.split(",") if t.strip()]
    for t in names:
        if t not in READERS:
            raise GptsError(f"--task: unknown task {t!r}; choose from {', '.join(ALL_TASKS)}, all")
    return names


# The Open SLM Leaderboard's index: each task's acc_norm normalised against chance, ARC-Easy and
# ARC-Challenge averaged into one term, ArithMark weighted 0.65 (we do not measure it, so it counts
# at chance, i.e. 0).
INDEX_WEIGHTS = {"hellaswag": 1.0, "arc": 1.0, "piqa": 1.0, "arithmark": 0.65}


def _normalised(score: float, chance: float) -> float:
    return 100 * (score - chance) / (100 - chance)


def leaderboard_index(results: dict[str, dict[str, Any]]) -> float | None:
    """The Open SLM Leaderboard index from acc_norm; None unless all four tasks were scored."""
    if not all(t in results for t in TASKS):
        return None
    terms = {
        "hellaswag": _normalised(results["hellaswag"]["acc_norm"], RANDOM_CHANCE["hellaswag"]),
        "arc": (
            _normalised(results["arc_easy"]["acc_norm"], RANDOM_CHANCE["arc_easy"])
            + _normalised(results["arc_challenge"]["acc_norm"], RANDOM_CHANCE["arc_challenge"])
        )
        / 2,
        "piqa": _normalised(results["piqa"]["acc_norm"], RANDOM_CHANCE["piqa"]),
        "arithmark": 0.0,  # not measured: at chance
    }
    total = sum(INDEX_WEIGHTS[k] * v for k, v in terms.items())
    return round(total / sum(INDEX_WEIGHTS.values()), 2)


def format_table(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        f"{'task':14s} {'acc':>7s} {'acc_norm':>9s} {'±':>5s} {'acc_bytes':>9s} {'chance':>7s} {'n':>6s} {'items/s':>8s}"
    ]
    for task, r in results.items():
        chance = f"{RANDOM_CHANCE[task]:.1f}" if task in RANDOM_CHANCE else "-"
        lines.append(
            f"{task:14s} {r['acc']:7.2f} {r['acc_norm']:9.2f} {r.get('acc_norm_stderr', float('nan')):5.2f} "
            f"{r['acc_bytes']:9.2f} {chance:>7s} {r['n']:6d} {r.get('items_per_s', float('nan')):8.1f}"
        )
    index = leaderboard_index(results)
    if index is not None:
        lines.append(
            f"Open SLM Leaderboard index {index:.2f} (acc_norm vs chance; ARC-E/ARC-C averaged; "
            "ArithMark weight 0.65 not measured, counted at chance)"
        )
    return "\n".join(lines)
