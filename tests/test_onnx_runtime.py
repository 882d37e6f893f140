"""The torch-free ONNX runtime: embedding API, CLI default runtime, user cache, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from gpts_edge.api import load
from gpts_edge.api import open_runtime as _open_runtime
from gpts_edge.errors import GptsError
from gpts_edge.runtimes.onnx import OnnxRuntime
from tests.conftest import REPO, run_cli

pytest.importorskip("onnx")


def open_onnx_runtime(model):
    return _open_runtime("onnx", model)


def quiet(_msg: str) -> None:
    pass


@pytest.fixture(scope="session")
def exported(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gpts_edge.export.onnx import export_onnx

    return export_onnx(tiny_checkpoint, tmp_path_factory.mktemp("onnx-rt") / "model.onnx", log=quiet).parent


@pytest.fixture(scope="session")
def rt(exported: Path) -> OnnxRuntime:
    return OnnxRuntime(exported)


def copy_folder(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def _no_torch_env(tmp_path: Path, block: tuple[str, ...] = ("torch",)) -> dict[str, str]:
    fake = tmp_path / "fake_modules"
    fake.mkdir(exist_ok=True)
    for name in block:
        (fake / f"{name}.py").write_text(f"raise ImportError('{name} is blocked in this test')\n")
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(fake), str(REPO)]),
        "XDG_CACHE_HOME": str(tmp_path / "c"),
    }


def test_runtime_generates_in_a_process_where_torch_cannot_be_imported(
    exported: Path, tmp_path: Path
) -> None:
    script = textwrap.dedent(f"""
        import sys
        try:
            import torch  # noqa: F401
            raise SystemExit("the fake torch module was not picked up")
        except ImportError:
            pass
        import numpy as np
        from gpts_edge.api import load
        m = load({str(exported)!r})
        text = m.generate("The river", max_new_tokens=8, greedy=True)
        logits = m.runtime.forward_logits(np.array([[1, 2, 3]]))
        assert logits.shape == (1, 3, 4096), logits.shape
        assert not any(k == "torch" or k.startswith("torch.") for k in sys.modules)
        print("OK", len(text))
    """)
    res = subprocess.run(
        [sys.executable, "-c", script],
        env=_no_torch_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("OK")


def test_stream_pieces_join_to_generate_text(exported: Path) -> None:
    m = load(exported)
    pieces = list(m.stream("Once upon a time", max_new_tokens=20, seed=3))
    assert len(pieces) >= 1
    assert "".join(pieces) == m.generate("Once upon a time", max_new_tokens=20, seed=3)


def test_one_session_is_reused_and_decode_runs_one_token_per_call(rt: OnnxRuntime, monkeypatch) -> None:
    from gpts_edge.generation import generate_ids
    from gpts_edge.sampling import SamplingOptions

    session = rt.step_session
    calls: list[int] = []
    real_run = session.run

    def counting_run(names, feeds):
        calls.append(feeds["input_ids"].shape[1])
        return real_run(names, feeds)

    monkeypatch.setattr(session, "run", counting_run)
    opts = SamplingOptions(temperature=0.0, max_new_tokens=6, stop_at_eos=False)
    out = list(generate_ids(rt, [5, 6, 7, 8, 9], opts))
    assert len(out) == 6
    assert calls == [5, 1, 1, 1, 1, 1]  # prefill in one call, then one token per call
    assert rt.step_session is session


def test_thread_count_is_configurable(exported: Path) -> None:
    rt2 = OnnxRuntime(exported, threads=2)
    assert rt2.session.get_session_options().intra_op_num_threads == 2
    assert OnnxRuntime(exported).session.get_session_options().intra_op_num_threads == 1
    with pytest.raises(GptsError, match="threads: expected a positive integer, found 0"):
        OnnxRuntime(exported, threads=0)


def test_a_dot_onnx_path_opens_like_its_folder(exported: Path, rt: OnnxRuntime) -> None:
    by_file = OnnxRuntime(exported / "model.onnx")
    ids = np.array([[3, 4, 5, 6]])
    assert np.array_equal(by_file.forward_logits(ids), rt.forward_logits(ids))


def test_checkpoint_is_exported_once_into_the_user_cache(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = open_onnx_runtime(tiny_checkpoint)
    folders = list((tmp_path / "gpts-edge").iterdir())
    assert len(folders) == 1 and folders[0].name.startswith("onnx-none-")
    assert first.model_path == folders[0] / "model.onnx"
    stamp = first.model_path.stat().st_mtime_ns
    second = open_onnx_runtime(tiny_checkpoint)
    assert second.model_path == first.model_path
    assert second.model_path.stat().st_mtime_ns == stamp  # reused, not re-exported


def test_cli_generate_defaults_to_onnx_and_matches_torch_greedy(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    args = ("generate", "Hello there", "--model", str(tiny_checkpoint), "--max-new-tokens", "12", "--greedy")
    onnx_res = run_cli(*args, env=env)
    assert onnx_res.returncode == 0, onnx_res.stderr
    assert list((tmp_path / "gpts-edge").glob("onnx-none-*/model.onnx"))  # the default runtime is onnx
    torch_res = run_cli(*args, "--runtime", "torch", env=env)
    assert torch_res.returncode == 0, torch_res.stderr
    assert onnx_res.stdout == torch_res.stdout


def test_missing_onnx_package_gives_install_hint(tiny_checkpoint: Path, tmp_path: Path) -> None:
    script = f"from gpts_edge.api import open_runtime\nopen_runtime('onnx', {str(tiny_checkpoint)!r})\n"
    env = _no_torch_env(tmp_path, block=("onnx",))
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "pip install 'gpts-edge[export]'" in res.stderr and "--model" in res.stderr


# --- bad input ---------------------------------------------------------------------------------------


def test_truncated_onnx_file_fails_clearly(exported: Path, tmp_path: Path) -> None:
    folder = copy_folder(exported, tmp_path / "cut")
    data = (folder / "model.onnx").read_bytes()
    (folder / "model.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(GptsError, match=r"model\.onnx: not a loadable ONNX model"):
        OnnxRuntime(folder)


def test_foreign_onnx_file_fails_naming_expected_inputs(exported: Path, tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    folder = copy_folder(exported, tmp_path / "foreign")
    graph = helper.make_graph(
        [helper.make_node("Relu", ["pixel_values"], ["out"])],
        "classifier",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3])],
    )
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9),
        str(folder / "model.onnx"),
    )
    with pytest.raises(
        GptsError, match=r"expected inputs \['input_ids', 'attention_mask'.*found \['pixel_values'\]"
    ):
        OnnxRuntime(folder)


def test_tokenizer_with_wrong_vocabulary_fails_clearly(exported: Path, tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models

    folder = copy_folder(exported, tmp_path / "wrongtok")
    tok = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "a": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.save(str(folder / "tokenizer.json"))
    with pytest.raises(GptsError, match=r"tokenizer\.json: vocabulary size: expected 4096 .*found 3"):
        OnnxRuntime(folder)


def test_token_ids_outside_the_vocabulary_fail_clearly(rt: OnnxRuntime) -> None:
    with pytest.raises(GptsError, match=r"token id 4096 is outside the vocabulary \(expected 0..4095\)"):
        rt.step(np.array([1, 4096]), rt.new_cache())
    with pytest.raises(GptsError, match="token id -1 is outside the vocabulary"):
        rt.forward_logits(np.array([[5, -1]]))


def test_sequence_longer_than_context_fails_clearly(rt: OnnxRuntime) -> None:
    ctx = rt.config.context_length
    with pytest.raises(
        GptsError,
        match=f"sequence of {ctx + 1} tokens is longer than the context "
        rf"\(expected at most {ctx}\)",
    ):
        rt.step(np.ones(ctx + 1, dtype=np.int64), rt.new_cache())
    _, cache = rt.step(np.ones(ctx, dtype=np.int64), rt.new_cache())
    with pytest.raises(GptsError, match="longer than the context"):
        rt.step(np.array([1]), cache)
    with pytest.raises(GptsError, match="longer than the context"):
        rt.forward_logits(np.ones((1, ctx + 1), dtype=np.int64))


def test_cli_generate_on_a_truncated_model_exits_2_with_one_line(exported: Path, tmp_path: Path) -> None:
    folder = copy_folder(exported, tmp_path / "cut")
    data = (folder / "model.onnx").read_bytes()
    (folder / "model.onnx").write_bytes(data[:1000])
    res = run_cli("generate", "hi", "--model", str(folder), "--runtime", "onnx")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "model.onnx" in lines[0]


def test_folder_without_onnx_file_fails_clearly(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({}))
    with pytest.raises(GptsError, match=r"no \.onnx file in this folder \(expected model\.onnx\)"):
        OnnxRuntime(tmp_path)


def test_plain_onnxruntime_example_matches_the_runtime_greedy(
    exported: Path, rt: OnnxRuntime, tmp_path: Path
) -> None:
    from gpts_edge.generation import generate_ids
    from gpts_edge.sampling import SamplingOptions

    example = REPO / "examples" / "embed_onnx.py"
    assert "gpts_edge" not in example.read_text().replace("gpts-edge", "")
    res = subprocess.run(
        [
            sys.executable,
            str(example),
            str(exported),
            "The river",
            "--max-new-tokens",
            "10",
            "--temperature",
            "0",
        ],
        env=_no_torch_env(tmp_path, block=("torch", "gpts_edge")),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    opts = SamplingOptions(temperature=0.0, repetition_penalty=1.0, no_repeat_ngram_size=0, max_new_tokens=10)
    ids = [t for t in generate_ids(rt, rt.tokenizer.encode("The river").ids, opts)]
    ids = ids[: ids.index(0)] if 0 in ids else ids
    assert res.stdout == rt.tokenizer.decode(ids) + "\n"


def test_onnxruntime_genai_runs_the_export_with_identical_greedy_tokens(
    exported: Path, rt: OnnxRuntime
) -> None:
    """genai_config.json is read by the real onnxruntime-genai (optional: skipped when absent)."""
    from gpts_edge.generation import generate_ids
    from gpts_edge.sampling import SamplingOptions

    og = pytest.importorskip("onnxruntime_genai")
    model = og.Model(str(exported))
    ids = og.Tokenizer(model).encode("The river")
    params = og.GeneratorParams(model)
    params.set_search_options(
        do_sample=False, max_length=len(ids) + 16, repetition_penalty=1.0, no_repeat_ngram_size=0
    )
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    got = []
    while not gen.is_done():
        gen.generate_next_token()
        got.append(int(gen.get_next_tokens()[0]))
    opts = SamplingOptions(
        temperature=0.0, repetition_penalty=1.0, no_repeat_ngram_size=0, max_new_tokens=16, stop_at_eos=False
    )
    want = list(generate_ids(rt, [int(t) for t in ids], opts))
    assert got[: len(want)] == want[: len(got)] and len(got) >= 8


def test_without_torch_the_torch_runtime_is_one_line_naming_the_extra_and_eval_runs_on_onnx(
    exported: Path, tmp_path: Path
) -> None:
    env = _no_torch_env(tmp_path)
    cli = [sys.executable, "-m", "gpts_edge.cli"]
    res = subprocess.run(
        [*cli, "generate", "Hi", "--runtime", "torch"], env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip().splitlines() == [
        "error: --runtime torch needs PyTorch, which this install lacks: pip install 'gpts-edge[train]' "
        "(or use --runtime onnx, which needs no torch)"
    ]
    items = tmp_path / "mc.jsonl"
    items.write_text(json.dumps({"context": "The sky is", "choices": ["blue", "a fish"], "answer": 0}) + "\n")
    res = subprocess.run(
        [
            *cli,
            "eval",
            "--task",
            "mc",
            "--data",
            str(items),
            "--model",
            str(exported),
            "--json",
            "--no-progress",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["mc"]["n"] == 1
