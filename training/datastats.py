"""Per-source reports on training data, taking the same ``--data`` sources as ``train``:
``data stats`` (documents, bytes, tokens, bytes per token) and ``data check`` (documents and
tokens that share an n-gram with an eval set; the matching itself is in
:mod:`gpts_edge.contamination`). Documents are streamed, never held in memory together. No torch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from gpts_edge.checkpoint import default_model_dir
from gpts_edge.contamination import NGRAM, load_eval_index
from gpts_edge.errors import GptsError
from gpts_edge.textdata import expand_paths, iter_documents
from gpts_edge.tokenizer import load_tokenizer
from gpts_edge.training.data import is_prepared, parse_data_spec

Log = Callable[[str], None]
_BATCH = 256  # documents per tokenizer call (encode_batch spreads them over the cores)


def _source_files(spec: str) -> tuple[str, list[Path]]:
    """A ``--data`` spec (``PATH[:WEIGHT]``; the weight is ignored here) -> (path, its files)."""
    path, _weight = parse_data_spec(spec)
    if path.startswith(("hf:", "card:")) or path == "card-mix":
        raise GptsError(f"--data {spec}: hub sources are not read here; give local files")
    if is_prepared(Path(path)):
        raise GptsError(f"--data {spec}: a prepared token folder holds no text; give the raw source")
    return path, expand_paths(path)


def _documents(files: list[Path]) -> Iterator[tuple[str, str]]:
    """(where, text) of every document: 'file#k' with k the document's index in its file."""
    for f in files:
        for k, text in enumerate(iter_documents(f)):
            yield f"{f}#{k}", text


def _tokenizer_path(tokenizer: str | Path | None) -> Path:
    return Path(tokenizer) if tokenizer else default_model_dir() / "tokenizer.json"


def source_stats(
    specs: list[str], tokenizer: str | Path | None = None, log: Log | None = None
) -> dict[str, Any]:
    """Documents, UTF-8 bytes of the text, tokens (no separators) and bytes/token per source."""
    if not specs:
        raise GptsError("--data: give at least one source")
    tok_path = _tokenizer_path(tokenizer)
    tok = load_tokenizer(tok_path)
    resolved = [_source_files(spec) for spec in specs]  # every path checked before the long work
    start = time.perf_counter()
    rows = []
    for path, files in resolved:
        docs = n_bytes = n_tokens = 0
        batch: list[str] = []

        def flush(batch: list[str] = batch) -> int:
            count = sum(len(e.ids) for e in tok.encode_batch(batch))
            batch.clear()
            return count

        for _, text in _documents(files):
            docs += 1
            n_bytes += len(text.encode("utf-8"))
            batch.append(text)
            if len(batch) >= _BATCH:
                n_tokens += flush()
        n_tokens += flush()
        if log:
            log(f"{path}: {docs:,} documents, {n_bytes:,} bytes, {n_tokens:,} tokens")
        rows.append(
            {
                "source": path,
                "files": len(files),
                "documents": docs,
                "bytes": n_bytes,
                "tokens": n_tokens,
                "bytes_per_token": round(n_bytes / n_tokens, 4) if n_tokens else None,
            }
        )
    total = {k: sum(r[k] for r in rows) for k in ("files", "documents", "bytes", "tokens")}
    total["bytes_per_token"] = round(total["bytes"] / total["tokens"], 4) if total["tokens"] else None
    return {
        "tokenizer": str(tok_path),
        "sources": rows,
        "total": total,
        "seconds": round(time.perf_counter() - start, 2),
    }


def check_sources(
    specs: list[str],
    against: list[str],
    n: int = NGRAM,
    tokenizer: str | Path | None = None,
    examples: int = 5,
    log: Log | None = None,
) -> dict[str, Any]:
    """Per source: documents, and documents / bytes / tokens that share an ``n``-word sequence
    (normalised, see :mod:`gpts_edge.contamination`) with any item of the eval files in
    ``against``; tokens are counted with the tokenizer for the contaminated documents only."""
    if not specs:
        raise GptsError("--data: give at least one source")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise GptsError(f"--n: expected a whole number of words >= 1, found {n}")
    resolved = [_source_files(spec) for spec in specs]
    tok_path = _tokenizer_path(tokenizer)
    tok = load_tokenizer(tok_path)  # loaded now, so a bad --tokenizer fails before the long scan
    t0 = time.perf_counter()
    index = load_eval_index(against, n)
    index_seconds = time.perf_counter() - t0
    if log:
        s = index.summary()
        log(
            f"eval set: {s['items']:,} items ({s['short_items']:,} shorter than {n} words), "
            f"{s['ngrams']:,} distinct {n}-grams, indexed in {index_seconds:.1f} s"
        )
    rows = []
    for path, files in resolved:
        t1 = time.perf_counter()
        docs = n_bytes = bad_docs = bad_bytes = bad_tokens = 0
        items_hit: set[tuple[str, str]] = set()
        shown: list[dict[str, str]] = []
        for where, text in _documents(files):
            docs += 1
            size = len(text.encode("utf-8"))
            n_bytes += size
            found = index.matches(text)
            if not found:
                continue
            bad_docs += 1
            bad_bytes += size
            bad_tokens += len(tok.encode(text).ids)
            items_hit.update((m.task, m.where) for m in found)
            if len(shown) < examples:
                m = found[0]
                shown.append({"document": where, "task": m.task, "item": m.where, "ngram": m.ngram})
        row = {
            "source": path,
            "files": len(files),
            "documents": docs,
            "bytes": n_bytes,
            "contaminated_documents": bad_docs,
            "contaminated_bytes": bad_bytes,
            "contaminated_tokens": bad_tokens,
            "eval_items_hit": len(items_hit),
            "examples": shown,
            "seconds": round(time.perf_counter() - t1, 2),
        }
        rows.append(row)
        if log:
            log(
                f"{path}: {bad_docs:,} of {docs:,} documents share a {n}-gram with the eval set "
                f"({bad_tokens:,} tokens) [{row['seconds']:.1f} s]"
            )
    keys = ("documents", "bytes", "contaminated_documents", "contaminated_bytes", "contaminated_tokens")
    return {
        "eval": index.summary(),
        "tokenizer": str(tok_path),
        "sources": rows,
        "total": {k: sum(r[k] for r in rows) for k in keys},
        "seconds": round(time.perf_counter() - t0, 2),
    }


def format_check(report: dict[str, Any]) -> str:
    """A plain-text table of ``check_sources``'s report."""
    n = report["eval"]["n"]
    w = max(len("source"), *(len(r["source"]) for r in report["sources"]))
    lines = [
        f"{'source':{w}s} {'documents':>10s} {'contaminated':>12s} {'tokens':>10s} {'eval items':>10s}",
    ]
    for r in report["sources"]:
        lines.append(
            f"{r['source']:{w}s} {r['documents']:>10,} {r['contaminated_documents']:>12,} "
            f"{r['contaminated_tokens']:>10,} {r['eval_items_hit']:>10,}"
        )
    t = report["total"]
    lines.append(
        f"{'total':{w}s} {t['documents']:>10,} {t['contaminated_documents']:>12,} "
        f"{t['contaminated_tokens']:>10,}"
    )
    lines.append(f"({n}-word overlaps; {report['eval']['items']:,} eval items; {report['seconds']:.1f} s)")
    for r in report["sources"]:
        for ex in r["examples"]:
            lines.append(f"  {ex['document']} ~ {ex['task']} {ex['item']}: {ex['ngram']!r}")
    return "\n".join(lines)


def format_stats(report: dict[str, Any]) -> str:
    """A plain-text table of ``source_stats``'s report."""
    w = max(len("source"), *(len(r["source"]) for r in report["sources"]))
    lines = [f"{'source':{w}s} {'documents':>10s} {'bytes':>14s} {'tokens':>13s} {'bytes/token':>11s}"]
    for r in [*report["sources"], {**report["total"], "source": "total"}]:
        bpt = f"{r['bytes_per_token']:.3f}" if r["bytes_per_token"] else "-"
        lines.append(
            f"{r['source']:{w}s} {r['documents']:>10,} {r['bytes']:>14,} {r['tokens']:>13,} {bpt:>11s}"
        )
    return "\n".join(lines)
