"""Decode tokens/s of the browser page in headless Chromium (onnxruntime-web, WASM).

    python examples/browser/bench.py [--model FOLDER ...] [--threads 1 2] [--tokens 200] [--repeats 3]

Each model folder is served by `gpts-edge web`'s server; the page's own generation loop runs
greedy decoding from a fixed prompt, and the median decode rate (prefill excluded) is printed
as JSON. Needs /usr/bin/chromium, `pip install playwright` and `npm ci --prefix examples/browser`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from playwright.sync_api import sync_playwright

from gpts_edge.web import WebServer

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
PROMPT = "Once upon a time"


def measure(browser, url: str, tokens: int, repeats: int) -> dict:
    page = browser.new_page()
    page.goto(url)
    page.wait_for_function("window.gpts !== undefined")
    status = page.evaluate("window.gpts.ready.then(() => document.querySelector('#status').textContent)")
    page.evaluate("([p, n]) => window.gpts.greedy(p, n)", [PROMPT, 20])  # warm-up
    rates, prefill = [], []
    for _ in range(repeats):
        r = page.evaluate("([p, n]) => window.gpts.greedy(p, n)", [PROMPT, tokens])
        rates.append(1000 * r["stats"]["decodeSteps"] / r["stats"]["decodeMs"])
        prefill.append(r["stats"]["prefillMs"])
    page.close()
    return {"decode_tokens_per_s": round(statistics.median(rates), 1), "all": [round(x, 1) for x in rates],
            "prefill_ms": round(statistics.median(prefill), 1), "status": status}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", help="exported ONNX folder (default: the bundled model)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    results = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
        for model in a.model or [None]:
            with WebServer(model, port=0, log=lambda _m: None) as server:
                for threads in a.threads:
                    t0 = time.time()
                    row = measure(browser, f"{server.url}?threads={threads}", a.tokens, a.repeats)
                    row.update(model=str(server.onnx_file), threads=threads, seconds=round(time.time() - t0, 1))
                    results.append(row)
                    print(json.dumps(row), flush=True)
        browser.close()


if __name__ == "__main__":
    main()
