"""Decode tok/s of ONNX export folders against llama.cpp q8_0/q4_0 in one run (measurement
script): the bench's own worker process per (repeat, runtime), round-robin, 1 thread.

    python scripts/quant_speed.py REPEAT FOLDER... [--peers llamacpp-q8_0,llamacpp-q4_0]
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from gpts_edge import bench


def main() -> None:
    args = sys.argv[1:]
    peers = ["llamacpp-q8_0"]
    if "--peers" in args:
        i = args.index("--peers")
        peers = args[i + 1].split(",")
        del args[i : i + 2]
    repeat, folders = int(args[0]), [Path(a) for a in args[1:]]
    prepared = [bench.prepare(p, None, lambda m: None) for p in peers]
    for f in folders:
        # "onnx-..." makes the worker open it with the ONNX runtime (decode flavour).
        size = sum(p.stat().st_size for p in f.glob("*.onnx"))
        prepared.append(bench.Prepared(f"onnx-{f.name}", str(f), size))
    tps: dict[str, list[float]] = {p.name: [] for p in prepared}
    for _ in range(repeat):
        for p in prepared:
            tps[p.name].append(bench._run_worker(p, 1, 32, 256)["decode_tokens_per_s"])
    base = tps[peers[0]]
    for p in prepared:
        ratio = [a / b for a, b in zip(tps[p.name], base, strict=True)]
        print(
            f"{p.name:28s} {p.model_bytes:>10,d} B  decode {statistics.median(tps[p.name]):7.0f} tok/s"
            f"  / {peers[0]} median-of-ratios {statistics.median(ratio):.3f} (min {min(ratio):.3f}, max {max(ratio):.3f})",
            flush=True,
        )


if __name__ == "__main__":
    main()
