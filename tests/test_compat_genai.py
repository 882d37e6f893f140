"""The exported ONNX folder runs unchanged in onnxruntime-genai, with our greedy tokens.

Uses the bundled (trained) model: its next-token margins are wide, so an argmax that flips
between onnxruntime builds would be a real disagreement, not a near-tie of random weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gpts_edge.generation import generate_ids, sampling_options
from gpts_edge.runtimes.onnx import OnnxRuntime

og = pytest.importorskip(
    "onnxruntime_genai",
    reason="onnxruntime-genai is not installed (pip install onnxruntime-genai; see docs/compat.md)",
)

PROMPTS = ("Once upon a time", "The little dog ran to the park and")
MAX_NEW = 60


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from gpts_edge.export.onnx import export_onnx

    root = tmp_path_factory.mktemp("genai")
    folders = {}
    for q in ("none", "int8", "int4"):
        folders[q] = root / q
        folders[q].mkdir()
        # The folder `gpts-edge export` writes: our runtime steps with model.decode.onnx, genai
        # reads model.onnx, so the comparison is also decode flavour against full graph.
        export_onnx(None, folders[q] / "model.onnx", quantize=q, log=lambda _m: None, decode_graph=True)
    return folders


def ours(folder: Path, prompt_ids: list[int], penalties: bool) -> list[int]:
    rt = OnnxRuntime(folder)
    extra = {} if penalties else {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0}
    opts = sampling_options(rt.generation_config, greedy=True, max_new_tokens=MAX_NEW, **extra)
    return list(generate_ids(rt, prompt_ids, opts))


def genai(folder: Path, prompt: str, penalties: bool) -> tuple[list[int], list[int], str]:
    """(prompt ids, new ids, decoded text) from onnxruntime-genai's own tokenizer and generator."""
    model = og.Model(str(folder))
    tok = og.Tokenizer(model)
    ids = [int(t) for t in tok.encode(prompt)]
    params = og.GeneratorParams(model)
    search = {"do_sample": False, "max_length": len(ids) + MAX_NEW}
    if not penalties:
        search.update(repetition_penalty=1.0, no_repeat_ngram_size=0)
    params.set_search_options(**search)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    new: list[int] = []
    while not gen.is_done():
        gen.generate_next_token()
        new.append(int(gen.get_next_tokens()[0]))
    return ids, new, tok.decode(new)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_tokens_identical_ours_vs_genai_fp32(exports: dict[str, Path], prompt: str) -> None:
    rt = OnnxRuntime(exports["none"])
    ids, new, text = genai(exports["none"], prompt, penalties=False)
    assert ids == rt.tokenizer.encode(prompt).ids
    expected = ours(exports["none"], ids, penalties=False)
    assert len(expected) == MAX_NEW
    assert new == expected
    assert text == rt.tokenizer.decode(expected)


def test_greedy_with_config_penalties_identical_ours_vs_genai(exports: dict[str, Path]) -> None:
    """genai_config.json carries repetition_penalty 1.1 and no_repeat_ngram_size 4; genai applies
    them the way our sampler does."""
    ids, new, _ = genai(exports["none"], PROMPTS[0], penalties=True)
    with_penalties = ours(exports["none"], ids, penalties=True)
    assert new == with_penalties
    assert with_penalties != ours(exports["none"], ids, penalties=False)  # the penalties did act


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_greedy_tokens_identical_ours_vs_genai_quantized(exports: dict[str, Path], quantize: str) -> None:
    ids, new, _ = genai(exports[quantize], PROMPTS[0], penalties=False)
    assert new == ours(exports[quantize], ids, penalties=False)


def test_genai_opens_onnx_subfolder_of_transformersjs_layout(tmp_path: Path) -> None:
    from gpts_edge.export.compat import export_transformersjs

    out = export_transformersjs(None, tmp_path / "tjs", quantize="none", log=lambda _m: None)
    ids, new, _ = genai(out / "onnx", PROMPTS[0], penalties=False)
    assert new == ours(out / "onnx", ids, penalties=False)
