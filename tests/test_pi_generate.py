"""examples/raspberry-pi/generate.py (onnxruntime + numpy + tokenizers only, for small boards)
decodes the same tokens as the project's ONNX runtime, greedy and sampled with a seed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("onnx")

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "examples/raspberry-pi/generate.py"
PROMPT = "Once upon a time there was"


@pytest.fixture(scope="module")
def ort_dir(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gpts_edge.export.ort import export_ort

    out = tmp_path_factory.mktemp("pi") / "model-ort"
    export_ort(tiny_checkpoint, out, log=lambda _m: None)
    return out


def _script(folder: Path, *args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(folder), PROMPT, "--json", "--max-new-tokens", "30", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _runtime_tokens(folder: Path, seed: int, greedy: bool) -> list[int]:
    from gpts_edge.generation import generate_ids, sampling_options
    from gpts_edge.runtimes.onnx import OnnxRuntime

    rt = OnnxRuntime(folder)
    opts = sampling_options(rt.generation_config, greedy=greedy, max_new_tokens=30)
    ids = list(generate_ids(rt, rt.tokenizer.encode(PROMPT).ids, opts, seed=seed))
    return ids[:-1] if ids and ids[-1] == 0 else ids  # the script does not print <|endoftext|>


def test_pi_script_greedy_and_seeded_tokens_match_onnx_runtime(ort_dir: Path) -> None:
    greedy = _script(ort_dir, "--greedy")
    assert greedy["model"] == "model.ort"
    assert greedy["tokens"] == _runtime_tokens(ort_dir, 0, greedy=True)
    sampled = _script(ort_dir, "--seed", "7")
    assert sampled["tokens"] == _runtime_tokens(ort_dir, 7, greedy=False)
    assert sampled["tokens"] != greedy["tokens"]  # the seeded run really sampled
    assert sampled["decode_tokens_per_s"] > 0


def test_pi_script_reports_missing_model_in_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), PROMPT], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        f"error: {tmp_path}: no model.ort or model.onnx (export with gpts-edge export)"
    ]
