"""`gpts-edge bench`: decode speed, prefill, time to first token, cold start, memory and file
size of every runtime, measured in one run so that ratios are trustworthy on a noisy machine.

The parent process prepares the model files, then starts one short-lived worker process per
(repeat, runtime), round-robin over the runtimes, so every runtime sees the same machine state
and its own peak RSS and cold start are measured alone. Each worker:

  cold_start_ms   from the worker's first line (before importing the runtime's libraries) to
                  the first token of a --prompt-tokens prompt
  ttft_ms         a warm prefill of --prompt-tokens tokens plus choosing the first token
  decode          --new-tokens greedy steps, one token per call (the sampler included)
  prefill_ms_384  one call with 384 tokens and an empty cache
  peak_rss_mb     the worker's peak resident set size

Figures are the median (and min/max) over --repeat workers. Beside them each runtime carries
the accuracy of its file (top-1 and mean KL against PyTorch fp32 on the parity text, measured
once per file: gpts_edge/bench_accuracy.py), and each ONNX runtime is compared with llama.cpp at
its own precision (gpts_edge/bench_llamacpp.py, gpts_edge/bench_report.py).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpts_edge.bench_accuracy import onnx_parity, text_accuracy
from gpts_edge.bench_llamacpp import (
    LLAMACPP_QUANTS,
    NOT_INSTALLED,
    LlamaCppRuntime,
    llama_cpp_installed,
    plain_checkpoint,
    prepare_llamacpp,
)
from gpts_edge.bench_report import format_table, ratios
from gpts_edge.errors import GptsError
from gpts_edge.fileio import cache_root

__all__ = ["ALL_RUNTIMES", "FIGURES", "format_table", "run_bench", "train_bench"]

ALL_RUNTIMES = (
    "onnx",
    "onnx-int8",
    "onnx-int4",
    "torch",
    "gguf",
    "llamacpp",
    "llamacpp-q8_0",
    "llamacpp-q4_0",
)
FIGURES = ("decode_tokens_per_s", "prefill_ms_384", "ttft_ms", "cold_start_ms", "peak_rss_mb", "model_bytes")

# Fixed prompt text: the prompt is its first --prompt-tokens tokens (repeated if needed).
PROMPT_TEXT = (
    "The river runs through the old town and past the mill, where the farmers once brought their grain. "
    "Today the mill is a museum, and children come to see how the great stone wheel was turned by water. "
)


@dataclass
class Prepared:
    name: str
    path: str  # what the worker opens
    model_bytes: int
    note: str = ""
    # top1_agreement, mean_kl and what they are measured against; None: not measured
    accuracy: dict[str, Any] | None = None


def _cache_root() -> Path:
    root = cache_root() / "bench"
    root.mkdir(parents=True, exist_ok=True)
    return root


def prepare(runtime: str, model: str | None, log: Callable[[str], None]) -> Prepared:
    """Export what ``runtime`` needs (cached by checkpoint hash), check parity first (ONNX) and
    measure the file's accuracy on the parity text (cached per file)."""
    from gpts_edge.checkpoint import resolve_model_dir

    ckpt = resolve_model_dir(model)
    if runtime == "torch":
        # The reference itself: top-1 1 and KL 0 by definition, not measured.
        return Prepared(
            runtime,
            str(ckpt),
            (ckpt / "model.safetensors").stat().st_size,
            accuracy={"top1_agreement": 1.0, "mean_kl": 0.0, "reference": "is the reference"},
        )
    if runtime.startswith("onnx"):
        from gpts_edge.api import cached_export

        quant = runtime.split("-")[1] if "-" in runtime else "none"
        # The one export cache (keyed by checkpoint, quantization and graph version); the runtime
        # steps with its decode flavour (model.decode.onnx).
        log(f"{runtime}: exporting (cached after the first time)")
        out = cached_export(ckpt, quantize=quant)
        log(f"{runtime}: parity against torch (cached per graph)")
        acc = onnx_parity(runtime, out.parent, ckpt, quant, _gguf_root(ckpt))
        return Prepared(runtime, str(out.parent), _onnx_bytes(out.parent), accuracy=_acc(acc, "torch fp32"))
    if runtime != "gguf" and runtime not in LLAMACPP_QUANTS:
        raise GptsError(f"--runtimes: unknown runtime {runtime!r}; choose from {', '.join(ALL_RUNTIMES)}")
    # GGUF files are not ONNX exports: they keep their own folder, keyed by the weights.
    root = _gguf_root(ckpt)
    if runtime == "gguf":
        from gpts_edge.export.gguf import export_gguf
        from gpts_edge.runtimes.gguf import GGUFRuntime

        out = root / "model-f32.gguf"
        if not out.is_file():
            export_gguf(str(ckpt), out, quant="f32", log=log)
        acc = _accuracy(runtime, out, ckpt, lambda: GGUFRuntime(out), root, log, "torch fp32")
        return Prepared(runtime, str(out), out.stat().st_size, accuracy=acc)
    out = prepare_llamacpp(runtime, ckpt, root, log)
    plain = plain_checkpoint(ckpt, root)
    acc = _accuracy(
        runtime,
        out,
        plain,
        lambda: LlamaCppRuntime(out, threads=1, scoring=True),
        root,
        log,
        "torch fp32 of the plain-GQA weights",
    )
    return Prepared(runtime, str(out), out.stat().st_size, note="plain-GQA weights (no XSA)", accuracy=acc)


def _gguf_root(ckpt: Path) -> Path:
    from gpts_edge.checkpoint import weights_sha256

    root = _cache_root() / weights_sha256(ckpt)[:16]
    root.mkdir(exist_ok=True)
    return root


def _acc(figures: dict[str, Any], reference: str) -> dict[str, Any]:
    return {
        "top1_agreement": figures["top1_agreement"],
        "mean_kl": figures["mean_kl"],
        "reference": reference,
    }


def _accuracy(
    runtime: str,
    file: Path,
    reference: Path,
    open_rt: Callable[[], Any],
    root: Path,
    log: Callable[[str], None],
    label: str,
) -> dict[str, Any] | None:
    try:
        import torch  # noqa: F401
    except ImportError:
        log(f"{runtime}: no accuracy column (it needs PyTorch for the reference logits)")
        return None
    log(f"{runtime}: accuracy on the parity text (cached per file)")
    return _acc(text_accuracy(file, reference, open_rt, root, runtime), label)


def _onnx_bytes(folder: Path) -> int:
    return sum(
        p.stat().st_size
        for p in folder.iterdir()
        if p.suffix in (".onnx", ".data") or p.name.endswith(".onnx.data")
    )


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def run_bench(
    model: str | None,
    runtimes: list[str],
    *,
    threads: int = 1,
    prompt_tokens: int = 32,
    new_tokens: int = 256,
    repeat: int = 5,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Every runtime in ``runtimes`` measured in one run; ``threads`` 0 means every core."""
    unknown = [r for r in runtimes if r not in ALL_RUNTIMES]
    if unknown:
        raise GptsError(f"--runtimes: unknown runtime {unknown[0]!r}; choose from {', '.join(ALL_RUNTIMES)}")
    threads = threads or os.cpu_count() or 1
    skipped: dict[str, str] = {}
    peers = [r for r in runtimes if r in LLAMACPP_QUANTS]
    if peers and not llama_cpp_installed():
        # One note for all of llama.cpp's runtimes, and the rest of the run goes on.
        log(f"skip {', '.join(peers)}: {NOT_INSTALLED}")
        skipped = dict.fromkeys(peers, NOT_INSTALLED)
        runtimes = [r for r in runtimes if r not in skipped]
    prepared = [prepare(name, model, log) for name in runtimes]
    samples: dict[str, list[dict[str, float]]] = {p.name: [] for p in prepared}
    for r in range(repeat):
        for p in prepared:
            log(f"repeat {r + 1}/{repeat}: {p.name}")
            samples[p.name].append(_run_worker(p, threads, prompt_tokens, new_tokens))
    results: dict[str, Any] = {}
    for p in prepared:
        rows = samples[p.name]
        entry: dict[str, Any] = {"model_bytes": p.model_bytes}
        for fig in FIGURES[:-1]:
            st = _stats([row[fig] for row in rows])
            entry[fig] = round(st["median"], 3)
            entry[f"{fig}_min"] = round(st["min"], 3)
            entry[f"{fig}_max"] = round(st["max"], 3)
        if p.accuracy:
            entry["top1_agreement"] = round(p.accuracy["top1_agreement"], 5)
            entry["mean_kl"] = float(f"{p.accuracy['mean_kl']:.4g}")
            entry["accuracy_reference"] = p.accuracy["reference"]
        if p.note:
            entry["note"] = p.note
        results[p.name] = entry
    meta = {
        "threads": threads,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "repeat": repeat,
        "machine": _machine(),
        "date": time.strftime("%Y-%m-%d"),
        "time_utc": time.strftime("%H:%M:%S", time.gmtime()),
        "skipped": skipped,
    }
    meta.update(ratios(results, threads))
    return {"results": results, "meta": meta}


def _run_worker(p: Prepared, threads: int, prompt_tokens: int, new_tokens: int) -> dict[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        out = fh.name
    cmd = [
        sys.executable,
        "-m",
        "gpts_edge.bench",
        p.name,
        p.path,
        str(threads),
        str(prompt_tokens),
        str(new_tokens),
        out,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    try:
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
            raise GptsError(f"bench worker for {p.name} failed: {tail[0]}")
        return json.loads(Path(out).read_text())
    finally:
        Path(out).unlink(missing_ok=True)


def _machine() -> str:
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime

    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, onnxruntime {onnxruntime.__version__}"


def train_bench(
    devices: list[str] | None = None,
    steps: int = 12,
    batch_size: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Trainer tokens/s at the seed model size on random tokens (data loading included),
    the median over the steps after the first three (which include warm-up / compilation)."""
    import json as _json

    import numpy as np
    import torch

    from gpts_edge.training.train import preset_config, train

    if devices is None:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        from gpts_edge.checkpoint import default_model_dir
        from gpts_edge.tokenizer import tokenizer_hash

        data = Path(tmp) / "random-tokens"
        data.mkdir()
        rng = np.random.default_rng(0)
        rng.integers(1, 4096, size=2_000_000, dtype=np.uint16).tofile(data / "train.bin")
        rng.integers(1, 4096, size=100_000, dtype=np.uint16).tofile(data / "val.bin")
        meta = {
            "format": "gpts-tokens",
            "tokenizer_sha256_16": tokenizer_hash(default_model_dir() / "tokenizer.json"),
        }
        (data / "meta.json").write_text(_json.dumps(meta))
        for dev in devices:
            gpu = dev.startswith("cuda")
            bs = batch_size or (256 if gpu else 16)
            run = Path(tmp) / f"run-{dev.replace(':', '-')}"
            tc = preset_config(
                "gpt-s-1.4m",
                data=[str(data)],
                out=str(run),
                max_steps=steps,
                batch_size=bs,
                grad_accum=1,
                device=dev,
                compile=gpu,
                log_every=1,
                eval_every=10**9,
                ckpt_every=10**9,
                eval_windows=1,
                progress=False,
            )
            log(f"train bench on {dev}: {steps} steps of {bs} x 384 tokens")
            train(tc)
            rows = [_json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            tps = [r["tokens_per_s"] for r in rows[3:]] or [r["tokens_per_s"] for r in rows]
            out[dev] = {
                "tokens_per_s": statistics.median(tps),
                "min": min(tps),
                "max": max(tps),
                "batch": f"{bs}x384",
                "dtype": "bf16" if gpu else "fp32",
                "device_name": torch.cuda.get_device_name() if gpu else _machine().split(",")[0],
            }
    return out


# --- worker -----------------------------------------------------------------------------------
def _open(name: str, path: str, threads: int) -> Any:
    if name in LLAMACPP_QUANTS:
        return LlamaCppRuntime(path, threads)
    from gpts_edge.api import open_runtime

    return open_runtime(name.split("-")[0], path, threads=threads)


def _worker(name: str, path: str, threads: int, prompt_tokens: int, new_tokens: int) -> dict[str, float]:
    t_start = time.perf_counter()
    import numpy as np

    rt = _open(name, path, threads)
    prompt = _prompt_ids(prompt_tokens)
    logits, _ = rt.step(np.asarray(prompt, dtype=np.int64), rt.new_cache())
    int(np.argmax(logits))
    cold = (time.perf_counter() - t_start) * 1000
    # warm-up: a short decode so lazy allocations are done before timing
    cache = rt.new_cache()
    logits, cache = rt.step(np.asarray(prompt, dtype=np.int64), cache)
    for _ in range(8):
        logits, cache = rt.step(np.asarray([int(np.argmax(logits))], dtype=np.int64), cache)
    t0 = time.perf_counter()
    logits, cache = rt.step(np.asarray(prompt, dtype=np.int64), rt.new_cache())
    tok = int(np.argmax(logits))
    ttft = (time.perf_counter() - t0) * 1000
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        logits, cache = rt.step(np.asarray([tok], dtype=np.int64), cache)
        tok = int(np.argmax(logits))
    decode_s = time.perf_counter() - t0
    long_prompt = np.asarray(_prompt_ids(384), dtype=np.int64)
    rt.step(long_prompt, rt.new_cache())
    t0 = time.perf_counter()
    rt.step(long_prompt, rt.new_cache())
    prefill = (time.perf_counter() - t0) * 1000
    return {
        "decode_tokens_per_s": new_tokens / decode_s,
        "prefill_ms_384": prefill,
        "ttft_ms": ttft,
        "cold_start_ms": cold,
        "peak_rss_mb": _peak_rss_mb(),
    }


def _peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM starts afresh at exec; ru_maxrss on Linux carries the
    parent's peak across fork + exec, which would charge the parent's torch to every worker."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _prompt_ids(n: int) -> list[int]:
    from gpts_edge.checkpoint import default_model_dir
    from gpts_edge.tokenizer import load_tokenizer

    ids = load_tokenizer(default_model_dir() / "tokenizer.json").encode(PROMPT_TEXT).ids
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


if __name__ == "__main__":
    name, path, threads, p_tok, n_tok, out_path = sys.argv[1:7]
    result = _worker(name, path, int(threads), int(p_tok), int(n_tok))
    Path(out_path).write_text(json.dumps(result))
