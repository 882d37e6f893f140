"""Decode tokens/s of the browser page in headless Chromium (onnxruntime-web, WASM).

    python examples/browser/bench.py [--model FOLDER ...] [--threads 1 2] [--graph decode full] [--tokens 200] [--repeats 3] [--native]
    python examples/browser/bench.py --steps 16 128 383 [--model FOLDER ...] [--threads 1] [--graph decode full] [--rounds 5] [--native]

Each model folder is served by `gpts-edge web`'s server; the page's own generation loop runs
greedy decoding from a fixed prompt, and the median decode rate (prefill excluded) is printed
as JSON. --native adds the same loop in Python onnxruntime (CPU, one thread) for comparison. Needs /usr/bin/chromium, `pip install playwright` and `npm ci --prefix examples/browser`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from playwright.sync_api import sync_playwright

from gpts_edge.web import WebServer

ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PROMPT = "Once upon a time"


def _row(rates: list[float], steps: list[float]) -> dict:
    """The mean decode rate of each run, and the rate implied by the median step time: the figure
    that stays put when other processes compete for the CPU."""
    med = statistics.median(steps)
    return {
        "decode_tokens_per_s": round(statistics.median(rates), 1),
        "runs": [round(x, 1) for x in rates],
        "median_step_ms": round(med, 3),
        "tokens_per_s_from_median_step": round(1000 / med, 1),
    }


def measure(browser, url: str, tokens: int, repeats: int) -> dict:
    page = browser.new_page()
    page.goto(url)
    page.wait_for_function("window.gpts !== undefined")
    status = page.evaluate("window.gpts.ready.then(() => document.querySelector('#info').textContent)")
    page.evaluate("([p, n]) => window.gpts.greedy(p, n)", [PROMPT, 20])  # warm-up
    rates, prefill, steps = [], [], []
    for _ in range(repeats):
        r = page.evaluate("([p, n]) => window.gpts.greedy(p, n)", [PROMPT, tokens])
        rates.append(1000 * r["stats"]["decodeSteps"] / r["stats"]["decodeMs"])
        prefill.append(r["stats"]["prefillMs"])
        steps += r["stats"]["stepMs"]
    # Sampling with the model's defaults (top-p 0.95 over 4,096 ids, penalties), timed end to end.
    sampled = []
    for seed in range(repeats):
        ms = page.evaluate(
            """async ([p, n, seed]) => {
                 const m = await window.gpts.ready;
                 const t0 = performance.now();
                 let k = 0;
                 for await (const _ of m.generate(m.tokenizer.encode(p), {...(await window.gpts.defaults()), max_new_tokens: n,
                                                  stop_at_eos: false}, {seed})) k++;
                 return (performance.now() - t0) / k;
               }""",
            [PROMPT, tokens, seed],
        )
        sampled.append(1000 / ms)
    page.close()
    return _row(rates, steps) | {
        "prefill_ms": round(statistics.median(prefill), 1),
        "sampled_tokens_per_s_wall": round(statistics.median(sampled), 1),
        "status": status,
    }


STEP_JS = """async ([past, n]) => {
  const m = await window.gpts.ready;
  const ids = Array.from({length: past}, (_, i) => 100 + (i % 50));
  const {cache} = await m.step(ids, m.newCache());
  const times = [];
  for (let i = 0; i < n; i++) {
    const t0 = performance.now();
    await m.step([5], cache);  // the same cache each time: one step after `past` tokens
    times.push(performance.now() - t0);
  }
  return times;
}"""


def measure_steps(
    browser, urls: list[str], pasts: list[int], n: int = 200, rounds: int = 1
) -> list[list[dict]]:
    """One decode step after a fixed number of cached tokens, n times, on one page per URL. With
    several rounds the pages take turns (round 1 on every page, then round 2...), so a change in
    the machine's load falls on all of them alike. Per page and past: the fastest step over all
    rounds (the figure a busy machine disturbs least), the median step, and each round's fastest."""
    pages = []
    for url in urls:
        page = browser.new_page()
        page.goto(url)
        page.wait_for_function("window.gpts !== undefined")
        page.evaluate("window.gpts.ready.then(() => true)")
        pages.append(page)
    times: list[dict[int, list[list[float]]]] = [{past: [] for past in pasts} for _ in urls]
    for _ in range(rounds):
        for k, page in enumerate(pages):
            for past in pasts:
                times[k][past].append(page.evaluate(STEP_JS, [past, n]))
    for page in pages:
        page.close()
    return [
        [
            {
                "past": past,
                "min_step_ms": round(min(min(r) for r in t[past]), 3),
                "median_step_ms": round(statistics.median([x for r in t[past] for x in r]), 3),
                "round_min_ms": [round(min(r), 3) for r in t[past]],
            }
            for past in pasts
        ]
        for t in times
    ]


def measure_native_steps(onnx_file: Path, pasts: list[int], n: int = 200) -> list[dict]:
    import numpy as np

    from gpts_edge.runtimes.onnx import OnnxRuntime

    rt = OnnxRuntime(onnx_file.parent, threads=1)
    rows = []
    for past in pasts:
        _, cache = rt.step(np.asarray([100 + i % 50 for i in range(past)]), rt.new_cache())
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            rt.step(np.asarray([5]), cache)
            times.append(1000 * (time.perf_counter() - t0))
        rows.append(
            {
                "past": past,
                "min_step_ms": round(min(times), 3),
                "median_step_ms": round(statistics.median(times), 3),
            }
        )
    return rows


def measure_native(onnx_file: Path, tokens: int, repeats: int) -> dict:
    """The same greedy loop in Python onnxruntime (CPU, one thread), timed per decode step."""
    import numpy as np

    from gpts_edge.runtimes.onnx import OnnxRuntime
    from gpts_edge.sampling import SamplingOptions, generate_tokens

    rt = OnnxRuntime(onnx_file.parent, threads=1)
    ids = rt.tokenizer.encode(PROMPT).ids
    opts = SamplingOptions(
        temperature=0.0,
        top_p=1.0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        max_new_tokens=tokens,
        stop_at_eos=False,
    )
    step_ms: list[float] = []

    def timed_step(t: np.ndarray, cache: object) -> tuple:
        t0 = time.perf_counter()
        out = rt.step(t, cache)
        if len(t) == 1:
            step_ms.append(1000 * (time.perf_counter() - t0))
        return out

    rates, steps = [], []
    for run in range(repeats + 1):  # the first run warms up
        step_ms.clear()
        for _ in generate_tokens(
            timed_step,
            rt.new_cache,
            ids,
            opts,
            context_length=rt.config.context_length,
            vocab_size=rt.config.vocab_size,
        ):
            pass
        if run:
            rates.append(1000 * len(step_ms) / sum(step_ms))
            steps += step_ms
    return _row(rates, steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", help="exported ONNX folder (default: the bundled model)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--graph",
        nargs="+",
        default=["full"],
        choices=["decode", "full"],
        help="the page's graph (?graph=): decode = model.decode.onnx, full = model.onnx",
    )
    ap.add_argument("--rounds", type=int, default=1, help="--steps: rounds taken in turns by the pages")
    ap.add_argument("--native", action="store_true", help="also time Python onnxruntime (CPU, 1 thread)")
    ap.add_argument(
        "--steps",
        type=int,
        nargs="*",
        metavar="PAST",
        help="instead: time single decode steps after PAST cached tokens (e.g. 16 128 383)",
    )
    a = ap.parse_args()
    results = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
        for model in a.model or [None]:
            with WebServer(model, port=0, log=lambda _m: None) as server:
                if a.steps:
                    combos = [(g, t) for g in a.graph for t in a.threads]
                    urls = [f"{server.url}?threads={t}&graph={g}" for g, t in combos]
                    for (graph, threads), rows in zip(
                        combos, measure_steps(browser, urls, a.steps, rounds=a.rounds), strict=True
                    ):
                        for row in rows:
                            row.update(
                                model=str(server.onnx_file), runtime=f"wasm, {threads} thread(s)", graph=graph
                            )
                            print(json.dumps(row), flush=True)
                    if a.native:
                        for row in measure_native_steps(server.onnx_file, a.steps):
                            row.update(model=str(server.onnx_file), runtime="python onnxruntime, 1 thread")
                            print(json.dumps(row), flush=True)
                    continue
                for graph in a.graph:
                    for threads in a.threads:
                        t0 = time.time()
                        url = f"{server.url}?threads={threads}&graph={graph}"
                        row = measure(browser, url, a.tokens, a.repeats)
                        row.update(
                            model=str(server.onnx_file),
                            threads=threads,
                            graph=graph,
                            seconds=round(time.time() - t0, 1),
                        )
                        results.append(row)
                        print(json.dumps(row), flush=True)
                if a.native:
                    row = measure_native(server.onnx_file, a.tokens, a.repeats)
                    row.update(model=str(server.onnx_file), runtime="python onnxruntime, 1 thread")
                    results.append(row)
                    print(json.dumps(row), flush=True)
        browser.close()


if __name__ == "__main__":
    main()
