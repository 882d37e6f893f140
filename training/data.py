"""Training data: sources tokenized once into uint16 token files, then sampled by weight.

A *prepared source* is a directory holding ``meta.json`` (``"format": "gpts-tokens"``),
``train.bin`` and ``val.bin`` (uint16 token ids, documents separated by ``<|endoftext|>``). Raw
sources (text, .jsonl, .jsonl.gz, directories, globs) are prepared into a cache directory keyed
by the files and the tokenizer's hash, so a second run (or a resumed one) skips tokenization.
A prepared directory can be named in ``--data`` directly, e.g. on a machine without the corpus.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gpts_edge.errors import GptsError
from gpts_edge.textdata import expand_paths, iter_documents
from gpts_edge.tokenizer import EOT_ID, load_tokenizer, tokenizer_hash

TOKENS_FORMAT = "gpts-tokens"
VAL_EVERY = 100  # one document in VAL_EVERY goes to the validation slice


def parse_data_spec(spec: str) -> tuple[str, float]:
    """'PATH[:WEIGHT]' -> (path, weight); a path may itself contain ':' only if a weight follows."""
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            weight = float(tail)
        except ValueError:
            return spec, 1.0
        if not (weight > 0 and math.isfinite(weight)):
            raise GptsError(f"--data {spec}: the weight must be a positive finite number, found {tail}")
        return head, weight
    return spec, 1.0


@dataclass
class Source:
    name: str
    weight: float
    train: np.ndarray
    val: np.ndarray
    dropped: dict | None = None  # what a DocumentFilter removed (meta.json's "dropped")


@dataclass(frozen=True)
class DocumentFilter:
    """Drops documents before tokenizing (``train --decontaminate``). ``key`` identifies what is
    dropped (e.g. the eval set's fingerprint) and enters the data-cache key, so a source cached
    without the filter is never reused with it, nor the reverse."""

    name: str
    key: str
    drop: Callable[[str], bool] = field(compare=False)


def is_prepared(path: Path) -> bool:
    meta = path / "meta.json"
    return path.is_dir() and meta.is_file() and json.loads(meta.read_text()).get("format") == TOKENS_FORMAT


# The card's five hub sources (repository, config, weight); `--data card-mix` names all five.
CARD_SOURCES: dict[str, tuple[str, str | None, float]] = {
    "fineweb-edu": ("HuggingFaceFW/fineweb-edu", "sample-10BT", 0.15),
    "cosmopedia-v2": ("HuggingFaceTB/smollm-corpus", "cosmopedia-v2", 0.30),
    "fineweb-hq": ("epfml/FineWeb-HQ", None, 0.20),
    "ultra-fineweb-qa": ("openbmb/Ultra-FineWeb-L3", "Ultra-FineWeb-L3-en-QA-Synthetic", 0.20),
    "ultra-fineweb-multi-style": (
        "openbmb/Ultra-FineWeb-L3",
        "Ultra-FineWeb-L3-en-Multi-Style-Synthetic",
        0.15,
    ),
}
HUB_DOCUMENTS = 200_000  # documents streamed from each hub source


def expand_card_mix(specs: list[str]) -> list[str]:
    """``card-mix`` -> the five ``card:NAME:WEIGHT`` sources of the model card."""
    out = []
    for spec in specs:
        if spec == "card-mix":
            out += [f"card:{name}:{w}" for name, (_, _, w) in CARD_SOURCES.items()]
        else:
            out.append(spec)
    return out


def _hub_documents(spec: str, limit: int) -> Iterator[str]:
    """Stream documents of ``hf:REPO[#CONFIG]`` or ``card:NAME`` from the Hugging Face hub.

    Fails at once with a clear message when `datasets` is missing or the hub is unreachable,
    rather than hanging in retries."""
    if spec.startswith("card:"):
        name = spec.removeprefix("card:")
        if name not in CARD_SOURCES:
            raise GptsError(f"--data {spec}: unknown card source; choose from {', '.join(CARD_SOURCES)}")
        repo, config, _ = CARD_SOURCES[name]
    else:
        repo, _, config = spec.removeprefix("hf:").partition("#")
        config = config or None
    try:
        import datasets
    except ImportError:
        raise GptsError(
            f"--data {spec}: hub sources need the `datasets` package (pip install datasets)"
        ) from None
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=5).close()
    except OSError as exc:
        raise GptsError(
            f"--data {spec}: the Hugging Face hub is unreachable ({exc}); use local files"
        ) from None
    stream = datasets.load_dataset(repo, config, split="train", streaming=True)

    def documents() -> Iterator[str]:
        for i, row in enumerate(stream):
            if i >= limit:
                return
            text = row.get("text") or row.get("content")
            if isinstance(text, str) and text:
                yield text

    return documents()


def prepare_source(
    spec: str, tokenizer_json: Path, cache_dir: Path, doc_filter: DocumentFilter | None = None
) -> Path:
    """Tokenize one raw source into ``cache_dir/<key>/`` unless it is there already; documents
    ``doc_filter`` drops are counted in meta.json (``dropped``) and never tokenized into it."""
    path = Path(spec)
    if is_prepared(path):
        return path
    hub = spec.startswith(("hf:", "card:"))
    if hub:
        key_src = json.dumps([spec, HUB_DOCUMENTS])
        files: list[Path] = []
    else:
        files = expand_paths(spec)
        key_src = json.dumps([[str(f.resolve()), f.stat().st_size, int(f.stat().st_mtime)] for f in files])
    if doc_filter is not None:
        key_src += json.dumps([doc_filter.name, doc_filter.key])
    key = hashlib.sha256((key_src + tokenizer_hash(tokenizer_json)).encode()).hexdigest()[:16]
    out = cache_dir / key
    if is_prepared(out):
        return out
    tok = load_tokenizer(tokenizer_json)
    print(f"tokenizing {spec} into {out}", flush=True)  # the first run's only slow part on big data
    # Checked before anything is written, so a missing package or network leaves no temp dir.
    documents = _hub_documents(spec, HUB_DOCUMENTS) if hub else (t for f in files for t in iter_documents(f))
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{key}.tmp-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    counts = {"train": 0, "val": 0}
    dropped = {"documents": 0, "tokens": 0, "checked": 0}
    with open(tmp / "train.bin", "wb") as ftrain, open(tmp / "val.bin", "wb") as fval:
        batch: list[str] = []
        n_doc = 0

        def flush() -> None:
            nonlocal n_doc
            for enc in tok.encode_batch(batch):
                ids = np.asarray([*enc.ids, EOT_ID], dtype=np.uint16)
                split = "val" if n_doc % VAL_EVERY == VAL_EVERY - 1 else "train"
                (fval if split == "val" else ftrain).write(ids.tobytes())
                counts[split] += len(ids)
                n_doc += 1
            batch.clear()

        documents = (
            _hub_documents(spec, HUB_DOCUMENTS)
            if not files
            else (t for f in files for t in iter_documents(f))
        )
        for text in documents:
            if doc_filter is not None:
                dropped["checked"] += 1
                if doc_filter.drop(text):
                    dropped["documents"] += 1
                    dropped["tokens"] += len(tok.encode(text).ids)  # text tokens, no separator
                    continue
            batch.append(text)
            if len(batch) >= 512:
                flush()
        flush()
    if counts["val"] == 0:  # a single small document: hold out its tail instead
        train = np.fromfile(tmp / "train.bin", dtype=np.uint16)
        cut = max(1, len(train) // 10)
        train[:-cut].tofile(tmp / "train.bin")
        train[-cut:].tofile(tmp / "val.bin")
        counts = {"train": len(train) - cut, "val": cut}
    meta = {
        "format": TOKENS_FORMAT,
        "source": spec,
        "documents": n_doc,
        "tokens": counts,
        "tokenizer_sha256_16": tokenizer_hash(tokenizer_json),
    }
    if doc_filter is not None:
        meta["dropped"] = {"filter": doc_filter.name, "key": doc_filter.key, **dropped}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    import shutil

    try:
        os.replace(tmp, out)
    except OSError:  # another process (e.g. the other DDP rank) finished the same source first
        shutil.rmtree(tmp, ignore_errors=True)
        if not is_prepared(out):
            raise
    return out


def load_sources(
    specs: list[str],
    tokenizer_json: Path,
    cache_dir: Path,
    seq_len: int,
    doc_filter: DocumentFilter | None = None,
    check_length: bool = True,
) -> list[Source]:
    """Prepared sources; ``doc_filter`` drops documents before tokenizing (decontamination);
    ``check_length=False`` leaves the length check to the caller (a fine-tune re-splits the tokens
    first)."""
    if not specs:
        raise GptsError("--data: give at least one training source")
    specs = expand_card_mix(specs)
    sources = []
    for spec in specs:
        path, weight = parse_data_spec(spec)
        prepared = prepare_source(path, tokenizer_json, cache_dir, doc_filter)
        meta = json.loads((prepared / "meta.json").read_text())
        want = tokenizer_hash(tokenizer_json)
        if meta.get("tokenizer_sha256_16") != want:
            raise GptsError(
                f"{prepared}/meta.json: tokenized with tokenizer {meta.get('tokenizer_sha256_16')}, "
                f"but this run's tokenizer is {want}"
            )
        train = np.fromfile(prepared / "train.bin", dtype=np.uint16)
        val = np.fromfile(prepared / "val.bin", dtype=np.uint16)
        if check_length and len(train) < seq_len + 2:
            raise GptsError(f"--data {path}: only {len(train)} training tokens, need more than {seq_len + 1}")
        sources.append(Source(path, weight, train, val, meta.get("dropped")))
    return sources


class Sampler:
    """Random windows of seq_len + 1 tokens; which source each window comes from follows the
    weights. All randomness is one numpy Generator whose state is saved for exact resumption."""

    def __init__(self, sources: list[Source], seq_len: int, seed: int) -> None:
        self.sources = sources
        self.seq_len = seq_len
        w = np.array([s.weight for s in sources], dtype=np.float64)
        self.probs = w / w.sum()
        self.rng = np.random.Generator(np.random.PCG64(seed))

    def batch(self, batch_size: int) -> np.ndarray:
        which = self.rng.choice(len(self.sources), size=batch_size, p=self.probs)
        out = np.empty((batch_size, self.seq_len + 1), dtype=np.int64)
        for k, s in enumerate(self.sources):
            rows = np.nonzero(which == k)[0]
            if len(rows):
                starts = self.rng.integers(0, len(s.train) - self.seq_len - 1, size=len(rows))
                out[rows] = s.train[starts[:, None] + np.arange(self.seq_len + 1)]
        return out

    def state(self) -> dict:
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        if "passes" in state:
            raise GptsError("the snapshot was written with --sampling passes; resume with --sampling passes")
        self.rng.bit_generator.state = state


class PassSampler(Sampler):
    """Passes over each source instead of independent random windows: a pass cuts the source into
    consecutive windows from a random offset and visits them in a random order, so every token is
    trained on once per pass (random windows give a token 6 +- 2.4 looks in six passes' worth of
    steps and under-sample both ends of the text). Which source a window comes from still follows
    the weights. A pass's offset and order depend only on (seed, source, pass), so the state to
    resume from is the source draw's generator and two numbers per source."""

    def __init__(self, sources: list[Source], seq_len: int, seed: int) -> None:
        super().__init__(sources, seq_len, seed)
        self.seed = seed
        self.cursor = [[0, 0] for _ in sources]  # per source: [pass, windows of it used]
        self._orders: dict[int, tuple[int, np.ndarray]] = {}

    def _order(self, k: int) -> np.ndarray:
        n_pass = self.cursor[k][0]
        if self._orders.get(k, (-1,))[0] != n_pass:
            rng = np.random.default_rng([self.seed, k, n_pass])
            span = len(self.sources[k].train) - self.seq_len - 1  # starts a random window may take
            offset = int(rng.integers(0, min(self.seq_len, span)))
            self._orders[k] = (n_pass, rng.permutation(np.arange(offset, span, self.seq_len)))
        return self._orders[k][1]

    def batch(self, batch_size: int) -> np.ndarray:
        which = self.rng.choice(len(self.sources), size=batch_size, p=self.probs)
        out = np.empty((batch_size, self.seq_len + 1), dtype=np.int64)
        for row, k in enumerate(which):
            if self.cursor[k][1] >= len(self._order(k)):
                self.cursor[k] = [self.cursor[k][0] + 1, 0]
            start = self._order(k)[self.cursor[k][1]]
            self.cursor[k][1] += 1
            out[row] = self.sources[k].train[start : start + self.seq_len + 1]
        return out

    def state(self) -> dict:
        return {"rng": super().state(), "passes": [list(c) for c in self.cursor]}

    def set_state(self, state: dict) -> None:
        if "passes" not in state:
            raise GptsError("the snapshot was written with --sampling random; resume with --sampling random")
        super().set_state(state["rng"])
        self.cursor = [list(c) for c in state["passes"]]


SAMPLINGS = ("random", "passes")


def check_sampling(kind: str) -> None:
    if kind not in SAMPLINGS:
        raise GptsError(f"--sampling: expected {' or '.join(SAMPLINGS)}, found {kind!r}")


def make_sampler(kind: str, sources: list[Source], seq_len: int, seed: int) -> Sampler:
    """``random`` windows (pretraining) or ``passes`` over the text (fine-tuning)."""
    check_sampling(kind)
    return (PassSampler if kind == "passes" else Sampler)(sources, seq_len, seed)


def validation_windows(sources: list[Source], seq_len: int, max_windows: int) -> np.ndarray:
    """Fixed, deterministic validation windows: consecutive chunks of each source's val slice,
    shared out by the mixing weights."""
    total_w = sum(s.weight for s in sources)
    rows = []
    for s in sources:
        n = max(1, int(round(max_windows * s.weight / total_w)))
        val = s.val if len(s.val) > seq_len + 1 else np.concatenate([s.val, s.train[-(seq_len + 2) :]])
        avail = (len(val) - 1) // seq_len
        for k in range(min(n, avail)):
            rows.append(val[k * seq_len : k * seq_len + seq_len + 1].astype(np.int64))
    return np.stack(rows)
