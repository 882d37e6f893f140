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

Figures are the median (and min/max) over --repeat workers.
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

from gpts_edge.errors import GptsError

ALL_RUNTIMES = ("onnx", "onnx-int8", "onnx-int4", "torch", "gguf", "llamacpp")
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


def _cache_root() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gpts-edge" / "bench"
    root.mkdir(parents=True, exist_ok=True)
    return root


def prepare(runtime: str, model: str | None, log: Callable[[str], None]) -> Prepared:
    """Export what ``runtime`` needs (cached by checkpoint hash) and check parity first."""
    from gpts_edge.checkpoint import resolve_model_dir, weights_sha256

    ckpt = resolve_model_dir(model)
    if runtime == "torch":
        return Prepared(runtime, str(ckpt), (ckpt / "model.safetensors").stat().st_size)
    if runtime.startswith("onnx"):
        from gpts_edge.api import cached_export
        from gpts_edge.parity import parity_report

        quant = runtime.split("-")[1] if "-" in runtime else "none"
        # The one export cache (keyed by checkpoint, quantization and graph version); the runtime
        # steps with its decode flavour (model.decode.onnx).
        log(f"{runtime}: exporting (cached after the first time)")
        out = cached_export(ckpt, quantize=quant)
        report = parity_report("onnx", ckpt, quantize=quant)
        if not report["ok"]:
            failed = [r["check"] for r in report["rows"] if not r["ok"]]
            raise GptsError(
                f"{runtime}: the graph fails parity ({', '.join(failed)}); refusing to benchmark it"
            )
        return Prepared(runtime, str(out.parent), _onnx_bytes(out.parent))
    if runtime not in ("gguf", "llamacpp"):
        raise GptsError(f"--runtimes: unknown runtime {runtime!r}; choose from {', '.join(ALL_RUNTIMES)}")
    # GGUF files are not ONNX exports: they keep their own folder, keyed by the weights.
    root = _cache_root() / weights_sha256(ckpt)[:16]
    root.mkdir(exist_ok=True)
    if runtime == "gguf":
        from gpts_edge.export.gguf import export_gguf

        out = root / "model-f32.gguf"
        if not out.is_file():
            export_gguf(str(ckpt), out, quant="f32", log=log)
        return Prepared(runtime, str(out), out.stat().st_size)
    return _prepare_llamacpp(ckpt, root, log)


def _onnx_bytes(folder: Path) -> int:
    return sum(
        p.stat().st_size
        for p in folder.iterdir()
        if p.suffix in (".onnx", ".data") or p.name.endswith(".onnx.data")
    )


def _prepare_llamacpp(ckpt: Path, root: Path, log: Callable[[str], None]) -> Prepared:
    """llama.cpp cannot run XSA: it runs the same weights as a plain-GQA llama model, which has
    the same size and the same per-token work minus the XSA projection."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise GptsError(
            "llamacpp: llama-cpp-python is not installed (pip install llama-cpp-python)"
        ) from None
    from gpts_edge.checkpoint import load_checkpoint, save_checkpoint
    from gpts_edge.export.gguf import export_gguf

    out = root / "llama-plain-gqa-f32.gguf"
    if not out.is_file():
        src = load_checkpoint(ckpt)
        plain = root / "plain-gqa-checkpoint"
        save_checkpoint(plain, src.config.replace(exclusive_attention=False), src.weights, src.tokenizer_path)
        export_gguf(str(plain), out, quant="f32", arch="llama", log=log)
    return Prepared("llamacpp", str(out), out.stat().st_size, note="plain-GQA weights (no XSA)")


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
    prepared: list[Prepared] = []
    skipped: dict[str, str] = {}
    for name in runtimes:
        try:
            prepared.append(prepare(name, model, log))
        except GptsError as exc:
            if name == "llamacpp" and "not installed" in str(exc):
                skipped[name] = str(exc)
                log(f"skip {name}: {exc}")
                continue
            raise
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
        "skipped": skipped,
    }
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


def format_table(report: dict[str, Any]) -> str:
    res = report["results"]
    head = f"{'runtime':<11} {'decode tok/s':>14} {'prefill384 ms':>14} {'ttft ms':>9} {'cold ms':>9} {'RSS MB':>8} {'file MB':>8}"
    lines = [head, "-" * len(head)]
    for name, e in res.items():
        lines.append(
            f"{name:<11} {e['decode_tokens_per_s']:>14.1f} {e['prefill_ms_384']:>14.2f} {e['ttft_ms']:>9.2f} "
            f"{e['cold_start_ms']:>9.0f} {e['peak_rss_mb']:>8.1f} {e['model_bytes'] / 1e6:>8.2f}"
        )
    base = res.get("llamacpp")
    if base:
        lines.append("")
        for name, e in res.items():
            if name != "llamacpp":
                lines.append(
                    f"{name:<11} decode {e['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x llama.cpp, "
                    f"prefill384 {e['prefill_ms_384'] / base['prefill_ms_384']:.2f}x llama.cpp's time"
                )
    if "torch" in res and "onnx" in res:
        lines.append(
            f"onnx decode {res['onnx']['decode_tokens_per_s'] / res['torch']['decode_tokens_per_s']:.1f}x torch eager"
        )
    m = report["meta"]
    lines.append(
        f"\n{m['machine']}; threads {m['threads']}; median of {m['repeat']} (min-max in --json); {m['date']}"
    )
    for name, why in m["skipped"].items():
        lines.append(f"skipped {name}: {why}")
    return "\n".join(lines)


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
    if name == "llamacpp":
        return _LlamaCppRuntime(path, threads)
    from gpts_edge.api import open_runtime

    return open_runtime(name.split("-")[0], path, threads=threads)


class _LlamaCppRuntime:
    """llama-cpp-python with an f32 KV cache, driven one call per step like the others."""

    def __init__(self, path: str, threads: int) -> None:
        import llama_cpp

        self.llm = llama_cpp.Llama(
            model_path=path,
            n_ctx=384,
            n_batch=384,
            n_ubatch=384,
            n_threads=threads,
            n_threads_batch=threads,
            type_k=llama_cpp.GGML_TYPE_F32,
            type_v=llama_cpp.GGML_TYPE_F32,
            logits_all=False,
            verbose=False,
        )
        self.tokenizer = None

    def new_cache(self) -> int:
        self.llm.reset()
        return 0

    def step(self, tokens, cache):
        self.llm.eval([int(t) for t in tokens])
        # Only the last row of `scores` is written when logits_all is off; `eval_logits` would
        # copy every row into Python lists on each call.
        return self.llm.scores[self.llm.n_tokens - 1], cache + len(tokens)


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
