"""Bytes one decode step reads, per runtime, and the time that takes at a measured bandwidth.

For docs/performance.md's roofline note. Weights are counted from the files the bench runs (the
bench's caches; run `gpts-edge bench` first):

  * ONNX: the decode graph's initializers. An embedding read by a Gather (and a rotary cos/sin
    table read by GroupQueryAttention) costs one row per step, except the tied head, which reads
    the whole matrix. int8 weights stored for DequantizeLinear
    are folded to float32 when the session loads (runtimes/onnx.py sets
    session.disable_quant_qdq), so they are counted at 4 bytes per weight, as they are read.
  * GGUF (numpy runtime and llama.cpp): every tensor's stored bytes; the head is tied, so
    token_embd is read whole once per step (for the logits) and one row of it for the input.
  * KV cache, f32 everywhere: layers x 2 x kv_heads x head_dim x 4 bytes per cached position,
    at the mean position of the bench's decode (prompt + new_tokens / 2).

    python scripts/roofline.py --bench bench.json --membw membw.json [--markdown]

bench.json is `gpts-edge bench --json`, membw.json is `python scripts/membw.py --json`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def onnx_step_bytes(graph: Path) -> int:
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(graph))
    sizes = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in m.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    total = 0
    for name, arr in sizes.items():
        ops = {n.op_type for n in consumers.get(name, [])}
        if ops and ops <= {"Gather", "GatherBlockQuantized", "GroupQueryAttention"} and arr.ndim:
            # Embedding rows and rotary cos/sin rows: one row per step.
            total += arr.nbytes // arr.shape[0]
        elif ops == {"DequantizeLinear"}:
            # Folded to float32 at load: the int8 weight is read as 4 bytes, its scales not at all.
            total += arr.size * 4 if arr.dtype.itemsize == 1 else 0
        else:
            total += arr.nbytes
    return total


def gguf_step_bytes(path: Path) -> int:
    from gguf import GGUFReader

    total = 0
    for t in GGUFReader(str(path)).tensors:
        total += int(t.n_bytes)
        if t.name == "token_embd.weight":
            total += int(t.n_bytes) // int(t.shape[-1])  # plus the input row
    return total


def kv_bytes(cfg: Any, position: float) -> float:
    return cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 4 * position


def step_files() -> dict[str, Path]:
    """The file each runtime of the bench steps with (from the bench's caches, no export)."""
    from gpts_edge import bench

    out = {}
    quiet = lambda _m: None  # noqa: E731
    for name in bench.ALL_RUNTIMES:
        if name == "torch":
            continue
        try:
            p = bench.prepare(name, None, quiet)
        except Exception as exc:  # a runtime this machine cannot prepare is left out
            print(f"# {name}: left out ({exc})")
            continue
        path = Path(p.path)
        out[name] = path / "model.decode.onnx" if path.is_dir() else path
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bench", required=True, help="gpts-edge bench --json output")
    ap.add_argument("--membw", required=True, help="scripts/membw.py --json output")
    ap.add_argument("--size", default="6 MiB", help="membw working set to use (the weights' size)")
    ap.add_argument("--dram-size", default="512 MiB")
    args = ap.parse_args()
    from gpts_edge.checkpoint import load_checkpoint, resolve_model_dir

    bench_json = json.loads(Path(args.bench).read_text())
    bw = json.loads(Path(args.membw).read_text())["sizes"]
    cache_bw = bw[args.size]["1 core"]["read"]
    dram_bw = bw[args.dram_size]["1 core"]["read"]
    meta = bench_json["_meta"]
    cfg = load_checkpoint(resolve_model_dir(None)).config
    pos = meta["prompt_tokens"] + meta["new_tokens"] / 2
    kv = kv_bytes(cfg, pos)
    print(
        f"mean position {pos:g}: KV read {kv / 1e3:.0f} kB per step; read bandwidth 1 core "
        f"{cache_bw:.1f} GB/s at {args.size}, {dram_bw:.1f} GB/s at {args.dram_size}\n"
    )
    print(
        "| runtime | weights read per step | + KV | floor at cache BW | floor at DRAM BW | measured | measured / cache floor |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, path in step_files().items():
        if name not in bench_json:
            continue
        w = onnx_step_bytes(path) if path.suffix == ".onnx" else gguf_step_bytes(path)
        total = w + kv
        floor = total / (cache_bw * 1e9) * 1e6
        floor_dram = total / (dram_bw * 1e9) * 1e6
        measured = 1e6 / bench_json[name]["decode_tokens_per_s"]
        print(
            f"| {name} | {w / 1e6:.2f} MB | {total / 1e6:.2f} MB | {floor:.0f} µs | {floor_dram:.0f} µs | "
            f"{measured:.0f} µs | {measured / floor:.1f}x |"
        )


if __name__ == "__main__":
    main()
