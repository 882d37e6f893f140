"""One loaded model, many threads: each call gets the tokens it would get alone."""

from __future__ import annotations

import threading

import pytest

from gpts_edge.api import load
from gpts_edge.config import PRESETS
from tests.conftest import make_checkpoint

pytest.importorskip("onnx")

THREADS = 8
ROUNDS = 3
PROMPTS = ("The lighthouse keeper", "Once upon a time", "", "a b c")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory, monkeypatch_module):
    # head_dim 16: the smallest shape the decode graph (with its IO binding) supports.
    cfg = PRESETS["tiny"].replace(head_dim=16)
    ckpt = make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny16", cfg, seed=2)
    monkeypatch_module.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
    m = load(ckpt)
    assert m.runtime._decoder is not None  # the IO-binding decode path is the one under test
    return m


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _job(i: int) -> tuple[str, int]:
    return PROMPTS[i % len(PROMPTS)], 1000 + i


def test_threads_sharing_one_model_get_the_sequential_results(model) -> None:
    kwargs = dict(max_new_tokens=40, temperature=1.0, top_k=0, top_p=1.0)
    expected = [model.generate(p, seed=s, **kwargs) for p, s in map(_job, range(THREADS))]
    assert len(set(expected)) > 1  # different seeds really give different texts
    for _ in range(ROUNDS):
        assert _run_together(model, kwargs) == expected


def _run_together(model, kwargs: dict) -> list[str | None]:
    """All THREADS jobs at once (released together by a barrier); re-raises a thread's error."""
    results: list[str | None] = [None] * THREADS
    errors: list[BaseException] = []
    start = threading.Barrier(THREADS)

    def run(i: int) -> None:
        try:
            start.wait()
            p, s = _job(i)
            results[i] = model.generate(p, seed=s, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def test_threads_scoring_and_generating_at_once_agree_with_sequential(model) -> None:
    import numpy as np

    ids = np.array([[5, 6, 7, 8, 9, 10]], dtype=np.int64)
    want_logits = model.runtime.forward_logits(ids)
    want_text = model.generate("The", seed=3, max_new_tokens=30)
    out: dict[int, object] = {}

    def run(i: int) -> None:
        out[i] = (
            model.runtime.forward_logits(ids) if i % 2 else model.generate("The", seed=3, max_new_tokens=30)
        )

    threads = [threading.Thread(target=run, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, v in out.items():
        if i % 2:
            np.testing.assert_array_equal(v, want_logits)
        else:
            assert v == want_text
    assert len(out) == THREADS


def test_threads_sharing_one_gguf_model_get_the_sequential_results(
    tiny_checkpoint, tmp_path_factory: pytest.TempPathFactory
) -> None:
    pytest.importorskip("gguf")
    from gpts_edge.export.gguf import export_gguf

    path = export_gguf(tiny_checkpoint, tmp_path_factory.mktemp("gguf") / "m.gguf", log=lambda _m: None)
    m = load(path)
    kwargs = dict(max_new_tokens=30, temperature=1.0, top_k=0, top_p=1.0)
    expected = [m.generate(p, seed=s, **kwargs) for p, s in map(_job, range(THREADS))]
    assert _run_together(m, kwargs) == expected
