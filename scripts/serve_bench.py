"""Load-test `gpts-edge serve`: aggregate completion tokens/s and request latency at several
concurrency levels, for 1 thread and for all cores. Each setting starts its own server process
(so the clients, in this process, do not share its interpreter) on a free loopback port.

    python scripts/serve_bench.py [--clients 1,4,16,64] [--threads 1,all] [--max-tokens 64]
                                  [--requests 4] [--repeat 3] [--modes defaults,greedy,stream]
                                  [--decode processes,threads] [--json]

Every client sends --requests completions one after another on one kept-alive connection (as
the openai client's pool does; prompt "The future of AI is",
seed = a distinct number per request; mode "defaults": the model's sampling defaults, "stream":
the same streamed (server-sent events, the usage in the last one), "greedy":
temperature 0); a level's figures are over all its requests: tokens/s = completion tokens / wall
time of the level, latency = each request's wall time (p50, p99). Each of --repeat rounds runs
every thread setting, mode and level in turn (the servers start once, up front); medians are
reported, with each round's figure and its ratio to the first level of the same round.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, threads: int, parallel: int, in_process: bool = False) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "gpts_edge.cli", "serve", "--port", str(port)]
    cmd += ["--threads", str(threads), "--parallel", str(parallel), "--max-queue", "1024"]
    cmd += ["--in-process"] if in_process else []
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not start")


def one_request(port: int, body: dict, conn: http.client.HTTPConnection | None = None) -> tuple[float, int]:
    """One completion; on ``conn`` (kept alive, as the openai client's connection pool does)
    when given, else on a connection of its own."""
    own = conn is None
    if own:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    start = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body), {"content-type": "application/json"})
    resp = conn.getresponse()
    raw = resp.read()
    elapsed = time.perf_counter() - start
    if body.get("stream") and resp.status == 200:  # server-sent events: the usage is in the last
        events = [line[6:] for line in raw.split(b"\n") if line.startswith(b"data: {")]
        data = json.loads(events[-1])
    else:
        data = json.loads(raw)
    if own:
        conn.close()
    if resp.status != 200:
        raise RuntimeError(f"request failed: {resp.status} {data}")
    return elapsed, data["usage"]["completion_tokens"]


def health(port: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/health")
    data = json.loads(conn.getresponse().read())
    conn.close()
    return data


def cpu_seconds(pid: int | None) -> float | None:
    """CPU time (user + system) of a process and its descendants (the server's engine processes),
    from /proc, or None where there is none."""
    if pid is None:
        return None
    cpu: dict[int, float] = {}
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        cpu[int(entry.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    if pid not in cpu:
        return None
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += cpu[p]
        todo += children.get(p, [])
    return total


def run_level(
    port: int,
    clients: int,
    requests: int,
    max_tokens: int,
    greedy: bool,
    pid: int | None = None,
    stream: bool = False,
) -> dict:
    def client(c: int) -> list[tuple[float, int]]:
        out = []
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)  # one per client, kept alive
        for r in range(requests):
            body = {"prompt": "The future of AI is", "max_tokens": max_tokens, "seed": 7919 * c + r}
            if stream:
                body.update(stream=True, stream_options={"include_usage": True})
            if greedy:
                body["temperature"] = 0
            out.append(one_request(port, body, conn))
        conn.close()
        return out

    one_request(port, {"prompt": "warm up", "max_tokens": 4})
    before = health(port)
    cpu_before = cpu_seconds(pid)
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [x for xs in pool.map(client, range(clients)) for x in xs]
    wall = time.perf_counter() - start
    cpu_after = cpu_seconds(pid)
    after = health(port)
    keys = ("steps", "tokens", "prefill_us", "decode_us", "sample_us", "deliver_us")
    d = {k: after.get(k, 0) - before.get(k, 0) for k in keys}  # prefill_us: not in older servers
    lat = np.array([r[0] for r in results]) * 1000
    tokens = sum(r[1] for r in results)
    return {
        "clients": clients,
        "requests": len(results),
        "tokens": tokens,
        "tok_s": tokens / wall,
        # Tokens per second of the server's own CPU time: less at the mercy of other jobs on the
        # machine than wall time (a preempted server uses no CPU), though still slowed by them.
        "tok_per_cpu_s": tokens / (cpu_after - cpu_before)
        if cpu_before is not None and cpu_after > cpu_before
        else 0.0,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        # The scheduler thread's share of the wall time: model steps, sampling, handing tokens over.
        "mean_batch": d["tokens"] / max(d["steps"], 1),
        "model_pct": d["decode_us"] / 1e4 / wall,
        "prefill_pct": d["prefill_us"] / 1e4 / wall,
        "sample_pct": d["sample_us"] / 1e4 / wall,
        "deliver_pct": d["deliver_us"] / 1e4 / wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="1,4,16,64")
    ap.add_argument("--threads", default="1,all", help="comma list; 'all' = every core")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--modes", default="defaults", help="comma list of defaults, greedy, stream")
    ap.add_argument("--greedy", action="store_true", help="same as --modes greedy")
    ap.add_argument("--repeat", type=int, default=3, help="rounds over the levels; medians reported")
    ap.add_argument(
        "--decode",
        default="processes",
        help="comma list: processes (engine processes, the default) and/or threads (--in-process)",
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    modes = ["greedy"] if args.greedy else args.modes.split(",")
    if not set(modes) <= {"defaults", "greedy", "stream"}:
        raise SystemExit(f"--modes: expected defaults, greedy and/or stream, found {args.modes}")
    report = {
        "cpu_count": os.cpu_count(),
        "load_avg_start": os.getloadavg(),
        "settings": vars(args),
        "runs": [],
    }
    decodes = args.decode.split(",")
    if not set(decodes) <= {"processes", "threads"}:
        raise SystemExit(f"--decode: expected processes and/or threads, found {args.decode}")
    settings = [
        (d, (os.cpu_count() or 1) if t == "all" else int(t)) for d in decodes for t in args.threads.split(",")
    ]
    servers: dict[tuple[str, int], tuple[int, subprocess.Popen]] = {}
    runs: dict[tuple[str, tuple[str, int], int], list[dict]] = {}
    try:
        for setting in settings:  # all servers up front: an idle one waits and uses no CPU
            port = free_port()
            servers[setting] = (
                port,
                start_server(port, setting[1], parallel=max(levels), in_process=setting[0] == "threads"),
            )
        # Every round runs every setting, mode and level in turn, so a change in the machine's load
        # hits them all; ratios between levels are taken within a round.
        for _ in range(args.repeat):
            for setting in settings:
                for mode in modes:
                    for clients in levels:
                        port, proc = servers[setting]
                        greedy = mode == "greedy"
                        level = run_level(
                            port, clients, args.requests, args.max_tokens, greedy, proc.pid, mode == "stream"
                        )
                        runs.setdefault((mode, setting, clients), []).append(level)
    finally:
        for _, proc in servers.values():
            proc.terminate()
            proc.wait(timeout=20)
    for mode in modes:
        for setting in settings:
            decode, threads = setting
            single = runs[(mode, setting, levels[0])]
            for clients in levels:
                rounds = runs[(mode, setting, clients)]
                row = {"mode": mode, "decode": decode, "threads": threads, "clients": clients}
                row.update({k: float(np.median([r[k] for r in rounds])) for k in rounds[0] if k != "clients"})
                row["tok_s_each_round"] = [round(r["tok_s"]) for r in rounds]
                # Against the first level (one client) of the same round, setting and mode.
                row["x_first_level_each_round"] = [
                    round(r["tok_s"] / s["tok_s"], 2) for r, s in zip(rounds, single, strict=True)
                ]
                report["runs"].append(row)
                if not args.json:
                    print(
                        f"{mode:8s} {decode:9s} threads {threads:2d}  clients {clients:3d}  {row['tok_s']:8.0f} tok/s  "
                        f"({row['tok_per_cpu_s']:.0f} per server CPU s)  "
                        f"p50 {row['p50_ms']:7.1f} ms  p99 {row['p99_ms']:7.1f} ms  "
                        f"(rounds {row['tok_s_each_round']}, x{levels[0]} client {row['x_first_level_each_round']}; "
                        f"batch {row['mean_batch']:.1f}, model {row['model_pct']:.0f}% + prefill "
                        f"{row['prefill_pct']:.0f}%, sampler {row['sample_pct']:.0f}%, hand-over "
                        f"{row['deliver_pct']:.0f}% of wall)",
                        flush=True,
                    )
    report["load_avg_end"] = os.getloadavg()
    if args.json:
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
