"""Memory read bandwidth of this machine, for the roofline note in docs/performance.md.

A stream-like numpy measurement: the read kernel is a float32 dot product of an array with
itself (BLAS sdot: one pass, SIMD, no writes), the copy kernel ``np.copyto`` (one read and one
write per byte, counted as two bytes moved), at working sets from L2-sized to far beyond the L3,
with one process and with one process per core running at the same time (their bandwidths
summed). Each figure is the best of --repeat timed passes after a warm-up, in GB/s (1e9 bytes/s).

    python scripts/membw.py [--sizes-mib 0.5,1.5,6,24,512] [--repeat 20] [--json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time

# Single-threaded BLAS in every process: "all cores" is one process per core, not BLAS threads.
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = "1"

import numpy as np  # noqa: E402


def _measure(size_bytes: int, repeat: int, start: object = None) -> dict[str, float]:
    n = size_bytes // 4
    a = np.random.default_rng(0).random(n, dtype=np.float32)
    b = np.empty_like(a)
    passes = max(1, int(2e8 // size_bytes))  # ~200 MB per timed sample, so small sets time well
    if start is not None:
        start.wait()  # every process starts timing together
    out = {}
    for kernel in ("read", "copy"):
        best = float("inf")
        for r in range(repeat + 1):
            t0 = time.perf_counter()
            for _ in range(passes):
                if kernel == "read":
                    np.dot(a, a)
                else:
                    np.copyto(b, a)
            dt = time.perf_counter() - t0
            if r:  # the first pass warms the caches and pages
                best = min(best, dt)
        moved = size_bytes * passes * (1 if kernel == "read" else 2)
        out[kernel] = moved / best / 1e9
    return out


def _child(size_bytes: int, repeat: int, start: object, q: object) -> None:
    q.put(_measure(size_bytes, repeat, start))


def measure_all_cores(size_bytes: int, repeat: int, procs: int) -> dict[str, float]:
    ctx = mp.get_context("fork")
    start, q = ctx.Barrier(procs), ctx.Queue()
    ps = [ctx.Process(target=_child, args=(size_bytes, repeat, start, q)) for _ in range(procs)]
    for p in ps:
        p.start()
    rows = [q.get() for _ in ps]
    for p in ps:
        p.join()
    return {k: sum(r[k] for r in rows) for k in rows[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes-mib", default="0.5,1.5,6,24,512")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    procs = os.cpu_count() or 1
    result = {"cores": procs, "sizes": {}}
    for s in [float(x) for x in args.sizes_mib.split(",")]:
        size = int(s * 2**20)
        one = _measure(size, args.repeat)
        allc = measure_all_cores(size, args.repeat, procs)
        result["sizes"][f"{s:g} MiB"] = {"1 core": one, f"{procs} cores": allc}
        if not args.json:
            print(
                f"{s:>7g} MiB  read 1 core {one['read']:6.1f} GB/s, {procs} cores {allc['read']:6.1f}  |  "
                f"copy 1 core {one['copy']:6.1f}, {procs} cores {allc['copy']:6.1f}",
                flush=True,
            )
    if args.json:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
