"""The bench's ratios against llama.cpp at the same precision, its targets, and the text table.

Ratios are taken within one run (every runtime measured round-robin in the same minutes), which
is the only comparison this kind of machine supports.
"""

from __future__ import annotations

from typing import Any

# runtime -> llama.cpp at the same weight precision
PEERS = {
    "onnx": "llamacpp",
    "onnx-int8": "llamacpp-q8_0",
    "onnx-int4": "llamacpp-q4_0",
    "gguf": "llamacpp",
    "torch": "llamacpp",
}
# (runtime, peer, figure, bound): decode speed ratios must reach the bound, prefill time ratios
# stay under it. Targets hold at 1 thread; other thread counts are reported without them.
TARGETS = (
    ("onnx", "llamacpp", "decode", 1.0),
    ("onnx-int8", "llamacpp-q8_0", "decode", 1.2),
    ("onnx-int4", "llamacpp-q4_0", "decode", 1.2),
    ("onnx", "llamacpp", "prefill_384", 0.5),
)


def ratios(results: dict[str, Any], threads: int) -> dict[str, Any]:
    """``{"ratios": {"A/B": {"decode": x, "prefill_384": y}}, "targets": [...]}``: decode is A's
    tokens/s over B's (higher is faster), prefill_384 is A's time over B's (lower is faster)."""
    out: dict[str, Any] = {}
    for name, peer in PEERS.items():
        if name in results and peer in results:
            a, b = results[name], results[peer]
            out[f"{name}/{peer}"] = {
                "decode": round(a["decode_tokens_per_s"] / b["decode_tokens_per_s"], 3),
                "prefill_384": round(a["prefill_ms_384"] / b["prefill_ms_384"], 3),
            }
    if "onnx" in results and "torch" in results:
        out["onnx/torch"] = {
            "decode": round(
                results["onnx"]["decode_tokens_per_s"] / results["torch"]["decode_tokens_per_s"], 3
            ),
            "prefill_384": round(results["onnx"]["prefill_ms_384"] / results["torch"]["prefill_ms_384"], 3),
        }
    targets = []
    if threads == 1:
        for name, peer, fig, bound in TARGETS:
            key = f"{name}/{peer}"
            if key in out:
                value = out[key][fig]
                met = value >= bound if fig == "decode" else value <= bound
                op = ">=" if fig == "decode" else "<="
                targets.append({"target": f"{key} {fig} {op} {bound}", "value": value, "met": met})
    return {"ratios": out, "targets": targets}


def format_table(report: dict[str, Any]) -> str:
    res = report["results"]
    head = (
        f"{'runtime':<14} {'decode tok/s':>12} {'prefill384 ms':>13} {'ttft ms':>8} {'cold ms':>8} "
        f"{'RSS MB':>7} {'file MB':>8} {'top-1 %':>8} {'KL':>9}"
    )
    lines = [head, "-" * len(head)]
    for name, e in res.items():
        top1 = f"{100 * e['top1_agreement']:.2f}" if "top1_agreement" in e else "-"
        kl = f"{e['mean_kl']:.3g}" if "mean_kl" in e else "-"
        lines.append(
            f"{name:<14} {e['decode_tokens_per_s']:>12.1f} {e['prefill_ms_384']:>13.2f} {e['ttft_ms']:>8.2f} "
            f"{e['cold_start_ms']:>8.0f} {e['peak_rss_mb']:>7.1f} {e['model_bytes'] / 1e6:>8.2f} {top1:>8} {kl:>9}"
        )
    m = report["meta"]
    if any("accuracy_reference" in e for e in res.values()):
        note = "top-1 / KL: against PyTorch fp32 on the parity text"
        if any(name.startswith("llamacpp") for name in res):
            note += "; llama.cpp rows against the plain-GQA weights they run (no XSA)"
        lines.append(note)
    rows = m.get("ratios", {})
    if rows:
        lines.append("")
        for key, r in rows.items():
            lines.append(f"{key:<28} decode {r['decode']:.2f}x, prefill384 {r['prefill_384']:.2f}x the time")
    for t in m.get("targets", []):
        lines.append(f"target {t['target']}: {t['value']:.2f} {'met' if t['met'] else 'MISSED'}")
    lines.append(
        f"\n{m['machine']}; threads {m['threads']}; median of {m['repeat']} (min-max in --json); "
        f"{m['date']}" + (f" {m['time_utc']} UTC" if "time_utc" in m else "")
    )
    if m["skipped"]:
        names = ", ".join(m["skipped"])
        reasons = sorted(set(m["skipped"].values()))
        lines.append(f"skipped {names}: {'; '.join(reasons)}")
    return "\n".join(lines)
