"""`gpts-edge bench` against llama.cpp at the same precision: the one skip note when
llama-cpp-python is absent, the accuracy column (measured once per file), the same-precision
ratios and their targets, and (when llama-cpp-python is installed) the peers themselves.
A tiny model keeps each worker process short."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("gguf")

from gpts_edge import bench  # noqa: E402
from gpts_edge.bench_report import format_table, ratios  # noqa: E402
from gpts_edge.errors import GptsError  # noqa: E402
from tests.test_onnx_decode import peaky16  # noqa: E402

PEERS = ["llamacpp", "llamacpp-q8_0", "llamacpp-q4_0"]
quiet = lambda _m: None  # noqa: E731


@pytest.fixture()
def model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return peaky16(tmp_path / "peaky16")


def test_bench_skips_every_llamacpp_runtime_with_one_note_when_llama_cpp_is_missing(
    model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bench, "llama_cpp_installed", lambda: False)
    logged: list[str] = []
    report = bench.run_bench(
        str(model), ["gguf", *PEERS], threads=0, prompt_tokens=8, new_tokens=4, repeat=1, log=logged.append
    )
    assert set(report["results"]) == {"gguf"}
    assert report["meta"]["threads"] == os.cpu_count()  # --threads 0: every core
    assert set(report["meta"]["skipped"]) == set(PEERS)
    skip_lines = [m for m in logged if m.startswith("skip")]
    assert len(skip_lines) == 1 and all(p in skip_lines[0] for p in PEERS)
    table_skips = [ln for ln in format_table(report).splitlines() if ln.startswith("skipped")]
    assert table_skips == [f"skipped {', '.join(PEERS)}: {bench.NOT_INSTALLED}"]
    # No peer ran (and not at 1 thread), so no target.
    assert report["meta"]["targets"] == []


def test_accuracy_column_is_measured_once_per_file_and_then_read_from_the_cache(
    model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = bench.prepare("gguf", str(model), quiet)
    assert first.accuracy is not None
    # The numpy GGUF runtime at f32 is the model itself: agreement is total, KL at rounding level.
    assert first.accuracy["top1_agreement"] == 1.0
    assert 0.0 <= first.accuracy["mean_kl"] < 1e-8

    import gpts_edge.parity as parity

    def must_not_run(*_a: object, **_k: object) -> None:
        raise AssertionError("accuracy measured again for an unchanged file")

    monkeypatch.setattr(parity, "text_figures", must_not_run)
    again = bench.prepare("gguf", str(model), quiet)
    assert again.accuracy == first.accuracy


def test_unknown_runtime_is_refused_before_anything_is_exported(model: Path, tmp_path: Path) -> None:
    with pytest.raises(GptsError, match="unknown runtime 'llamacpp-q5_1'"):
        bench.run_bench(str(model), ["onnx", "llamacpp-q5_1"], repeat=1, log=quiet)
    assert not (tmp_path / "cache" / "gpts-edge").exists()


def _entry(tok_s: float, prefill_ms: float) -> dict[str, float]:
    return {"decode_tokens_per_s": tok_s, "prefill_ms_384": prefill_ms}


def test_each_runtime_is_compared_with_llama_cpp_at_its_own_precision_and_targets_only_at_one_thread() -> (
    None
):
    results = {
        "onnx": _entry(2000, 20),
        "onnx-int8": _entry(2300, 21),
        "onnx-int4": _entry(4000, 30),
        "llamacpp": _entry(2100, 100),
        "llamacpp-q8_0": _entry(2000, 90),
        "llamacpp-q4_0": _entry(2500, 95),
        "torch": _entry(500, 25),
    }
    out = ratios(results, threads=1)
    r = out["ratios"]
    assert r["onnx-int8/llamacpp-q8_0"]["decode"] == pytest.approx(1.15)
    assert r["onnx-int4/llamacpp-q4_0"]["decode"] == pytest.approx(1.6)
    assert r["onnx/llamacpp"]["prefill_384"] == pytest.approx(0.2)
    assert r["onnx/torch"]["decode"] == pytest.approx(4.0)
    met = {t["target"]: t["met"] for t in out["targets"]}
    assert met == {
        "onnx/llamacpp decode >= 1.0": False,  # 0.952
        "onnx-int8/llamacpp-q8_0 decode >= 1.2": False,  # 1.15
        "onnx-int4/llamacpp-q4_0 decode >= 1.2": True,  # 1.6
        "onnx/llamacpp prefill_384 <= 0.5": True,  # 0.2
    }
    assert ratios(results, threads=2)["targets"] == []


def test_llamacpp_peers_run_each_precision_and_score_against_the_plain_gqa_weights(model: Path) -> None:
    pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (optional; pip install llama-cpp-python)"
    )
    report = bench.run_bench(str(model), PEERS, prompt_tokens=8, new_tokens=8, repeat=1, log=quiet)
    res = report["results"]
    assert set(res) == set(PEERS)
    for name in PEERS:
        assert res[name]["decode_tokens_per_s"] > 0 and res[name]["prefill_ms_384"] > 0
        assert "plain-GQA" in res[name]["accuracy_reference"]
    # f32 in llama.cpp is the same function as torch on the plain-GQA weights.
    assert res["llamacpp"]["top1_agreement"] >= 0.99 and res["llamacpp"]["mean_kl"] < 1e-4
    # Fewer bits: a smaller file that loses accuracy, in order.
    assert (
        res["llamacpp"]["model_bytes"]
        > res["llamacpp-q8_0"]["model_bytes"]
        > res["llamacpp-q4_0"]["model_bytes"]
    )
    assert res["llamacpp"]["mean_kl"] < res["llamacpp-q8_0"]["mean_kl"] < res["llamacpp-q4_0"]["mean_kl"]
