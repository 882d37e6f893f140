"""`gpts-edge bench` over the ONNX runtime: JSON shape, the decode flavour it benchmarks, and the
refusal to benchmark a graph that fails parity. A tiny model keeps each worker process short."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("onnx")
pytest.importorskip("torch")

from gpts_edge.bench import FIGURES, run_bench  # noqa: E402
from gpts_edge.errors import GptsError  # noqa: E402
from tests.test_onnx_decode import peaky16  # noqa: E402


@pytest.fixture()
def bench_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return peaky16(tmp_path / "peaky16")


def test_bench_reports_every_figure_for_onnx_and_torch_and_benchmarks_the_decode_flavour(
    bench_env: Path, tmp_path: Path
) -> None:
    report = run_bench(
        str(bench_env), ["onnx", "torch"], prompt_tokens=8, new_tokens=16, repeat=1, log=lambda _m: None
    )
    res = report["results"]
    assert set(res) == {"onnx", "torch"}
    for entry in res.values():
        for fig in FIGURES:
            assert entry[fig] > 0, fig
        assert (
            entry["decode_tokens_per_s_min"]
            <= entry["decode_tokens_per_s"]
            <= entry["decode_tokens_per_s_max"]
        )
    # The one export cache (gpts_edge.api), shared with generate and load().
    exported = list((tmp_path / "cache" / "gpts-edge").glob("onnx-none-v*/model.decode.onnx"))
    assert len(exported) == 1
    # model_bytes counts both graphs of the folder (the compatible one serves scoring).
    folder = exported[0].parent
    assert res["onnx"]["model_bytes"] == sum(p.stat().st_size for p in folder.glob("*.onnx"))
    assert report["meta"]["threads"] == 1 and report["meta"]["repeat"] == 1


def test_bench_refuses_a_graph_that_fails_parity(bench_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gpts_edge import parity

    monkeypatch.setitem(parity.BOUNDS, ("onnx", "none"), (1e-8, 1.01))  # top-1 > 100 %: impossible
    with pytest.raises(
        GptsError, match="onnx: the graph fails parity .*top-1 agreement.*refusing to benchmark it"
    ):
        run_bench(str(bench_env), ["onnx"], prompt_tokens=8, new_tokens=4, repeat=1, log=lambda _m: None)
