"""Bad GGUF files: one clear GptsError (exit 2 from the CLI), never a library traceback."""

from __future__ import annotations

import signal
import struct
import time
import tracemalloc

import numpy as np
import pytest

from gpts_edge.checkpoint import load_checkpoint, save_checkpoint
from gpts_edge.config import PRESETS
from gpts_edge.errors import GptsError
from gpts_edge.names import expected_shapes
from tests.conftest import run_cli

gguf = pytest.importorskip("gguf")

from gpts_edge.export.gguf import export_gguf, plan_gguf, write_plan  # noqa: E402
from gpts_edge.gguf_format import read_gguf  # noqa: E402
from gpts_edge.runtimes.gguf import GGUFRuntime  # noqa: E402


@pytest.fixture(scope="session")
def tiny_plan_source(tiny_checkpoint):
    return load_checkpoint(tiny_checkpoint)


def _write(plan, tmp_path, name="bad.gguf"):
    return write_plan(plan, tmp_path / name)


def _drop_key(plan, key):
    plan.kv = [kv for kv in plan.kv if kv[0] != key]
    return plan


@pytest.mark.parametrize(
    "key",
    [
        "gpts.attention.head_count_kv",
        "gpts.attention.exclusive",
        "tokenizer.ggml.tokens",
        "general.architecture",
    ],
)
def test_missing_required_key_is_named(tiny_plan_source, tmp_path, key):
    path = _write(_drop_key(plan_gguf(tiny_plan_source), key), tmp_path)
    if key == "general.architecture":
        # gguf-py always writes this key itself: rename it in the bytes instead (same length).
        path.write_bytes(path.read_bytes().replace(b"general.architecture", b"general.architecturx", 1))
    with pytest.raises(GptsError, match=f"missing required key '{key}'"):
        read_gguf(path)


def test_key_of_wrong_type_is_named(tiny_plan_source, tmp_path):
    plan = plan_gguf(tiny_plan_source)
    plan.kv = [
        (k, "2", gguf.GGUFValueType.STRING, None) if k == "gpts.block_count" else (k, v, t, s)
        for k, v, t, s in plan.kv
    ]
    with pytest.raises(GptsError, match="'gpts.block_count': expected an integer, found string"):
        read_gguf(_write(plan, tmp_path))


def test_tensor_of_wrong_shape_is_named(tiny_plan_source, tmp_path):
    plan = plan_gguf(tiny_plan_source)
    plan.tensors = [(n, d[:, :-8].copy() if n == "blk.1.attn_k.weight" else d, q) for n, d, q in plan.tensors]
    with pytest.raises(
        GptsError, match=r"tensor 'blk.1.attn_k.weight': expected shape \[32, 16\].*found \[24, 16\]"
    ):
        read_gguf(_write(plan, tmp_path))


def test_tensor_of_unsupported_type_is_named(tiny_plan_source, tmp_path):
    plan = plan_gguf(tiny_plan_source)
    plan.tensors = [
        (n, d.astype(np.int32) if n == "output_norm.weight" else d, q) for n, d, q in plan.tensors
    ]
    with pytest.raises(GptsError, match="tensor 'output_norm.weight': unsupported ggml type"):
        read_gguf(_write(plan, tmp_path))


def test_unknown_and_missing_tensors_are_errors(tiny_plan_source, tmp_path):
    plan = plan_gguf(tiny_plan_source)
    embd = next(d for n, d, q in plan.tensors if n == "token_embd.weight")
    plan.tensors.append(("output.weight", embd, gguf.GGMLQuantizationType.F32))
    with pytest.raises(GptsError, match="unexpected tensor 'output.weight'"):
        read_gguf(_write(plan, tmp_path, "extra.gguf"))
    plan = plan_gguf(tiny_plan_source)
    plan.tensors = [t for t in plan.tensors if t[0] != "blk.0.ffn_up.weight"]
    with pytest.raises(GptsError, match="missing tensor 'blk.0.ffn_up.weight'"):
        read_gguf(_write(plan, tmp_path, "missing.gguf"))


def test_unknown_architecture_is_named(tiny_plan_source, tmp_path):
    plan = plan_gguf(tiny_plan_source)
    plan.arch = "mamba"
    with pytest.raises(GptsError, match="unknown architecture 'mamba'"):
        read_gguf(_write(plan, tmp_path))


@pytest.fixture(scope="session")
def good_bytes(tiny_checkpoint, tmp_path_factory):
    path = export_gguf(tiny_checkpoint, tmp_path_factory.mktemp("gguf") / "good.gguf", log=lambda m: None)
    return path.read_bytes()


def test_bad_magic_version_and_truncation_are_named(good_bytes, tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"GGML" + good_bytes[4:])
    with pytest.raises(GptsError, match="bad magic"):
        read_gguf(p)
    p.write_bytes(good_bytes[:4] + struct.pack("<I", 99) + good_bytes[8:])
    with pytest.raises(GptsError, match="unsupported GGUF version 99"):
        read_gguf(p)
    for cut in (0, 3, 10, 23, 200, len(good_bytes) // 2, len(good_bytes) - 1):
        p.write_bytes(good_bytes[:cut])
        with pytest.raises(GptsError, match="truncated"):
            read_gguf(p)


def test_huge_array_count_is_refused_before_gguf_py_loops_over_it(good_bytes, tmp_path):
    # gguf-py's reader walks array items one by one over its memory map: a count of 2**40 would
    # spin (nearly) forever on a 100 KB file. The structural scan must catch it first.
    raw = bytearray(good_bytes)
    at = raw.index(b"tokenizer.ggml.token_type") + len(b"tokenizer.ggml.token_type")
    assert struct.unpack_from("<II", raw, at) == (9, 5)  # array of int32
    struct.pack_into("<Q", raw, at + 8, 2**40)
    p = tmp_path / "huge.gguf"
    p.write_bytes(bytes(raw))
    start = time.perf_counter()
    with pytest.raises(GptsError, match=r"array 'tokenizer.ggml.token_type' \(1099511627776 items\)"):
        read_gguf(p)
    assert time.perf_counter() - start < 5


def test_cli_reports_a_bad_gguf_in_one_line_with_exit_2(good_bytes, tmp_path):
    p = tmp_path / "cut.gguf"
    p.write_bytes(good_bytes[: len(good_bytes) // 3])
    r = run_cli("generate", "hi", "--runtime", "gguf", "--model", p)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "truncated" in lines[0]
    assert "Traceback" not in r.stderr


def test_cli_refuses_llama_arch_for_xsa_model_with_exit_2(tiny_checkpoint, tmp_path):
    r = run_cli(
        "export", "--format", "gguf", "--model", tiny_checkpoint, "-o", tmp_path / "l.gguf", "--arch", "llama"
    )
    assert r.returncode == 2
    assert "exclusive attention" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "l.gguf").exists()


# --- fuzz ----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def small_gguf(tiny_text, tmp_path_factory):
    """A very small valid GGUF (vocabulary 300, one layer) so hundreds of parses stay fast."""
    from gpts_edge.tokenizer import iter_texts, save_tokenizer, train_tokenizer

    root = tmp_path_factory.mktemp("fuzz")
    tok = train_tokenizer(iter_texts([tiny_text]), vocab_size=300)
    save_tokenizer(tok, root / "tokenizer.json")
    cfg = PRESETS["tiny"].replace(vocab_size=300, num_layers=1, context_length=16)
    rng = np.random.default_rng(0)
    weights = {n: (rng.standard_normal(s) * 0.05).astype(np.float32) for n, s in expected_shapes(cfg).items()}
    ckpt = save_checkpoint(root / "ckpt", cfg, weights, root / "tokenizer.json")
    return export_gguf(ckpt, root / "small.gguf", quant="q8_0", log=lambda m: None).read_bytes()


def _data_offset(raw: bytes, tmp_path) -> int:
    p = tmp_path / "probe.gguf"
    p.write_bytes(raw)
    return int(gguf.GGUFReader(p).data_offset)


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang


def test_fuzzed_gguf_files_only_ever_raise_gpts_error(small_gguf, tmp_path):
    raw = small_gguf
    header = _data_offset(raw, tmp_path)
    rng = np.random.default_rng(1234)
    path = tmp_path / "fuzz.gguf"
    outcomes = {"loaded": 0, "GptsError": 0}
    old = signal.signal(signal.SIGALRM, _alarm)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        for case in range(300):
            data = bytearray(raw)
            kind = case % 4
            if kind == 0:  # flip a few bits anywhere in the header
                for _ in range(int(rng.integers(1, 4))):
                    data[int(rng.integers(0, header))] ^= 1 << int(rng.integers(0, 8))
            elif kind == 1:  # random bytes anywhere
                for _ in range(int(rng.integers(1, 8))):
                    data[int(rng.integers(0, len(data)))] = int(rng.integers(0, 256))
            elif kind == 2:  # a huge or random 8-byte value over a header count/length/offset
                at = int(rng.integers(0, header - 8))
                value = [2**64 - 1, 2**63, 2**32, int(rng.integers(0, 2**62))][int(rng.integers(0, 4))]
                data[at : at + 8] = value.to_bytes(8, "little")
            else:  # truncation, possibly after a flip
                if rng.random() < 0.5:
                    data[int(rng.integers(0, header))] ^= 0xFF
                del data[int(rng.integers(0, len(data))) :]
            path.write_bytes(bytes(data))
            tracemalloc.reset_peak()
            signal.alarm(10)
            try:
                GGUFRuntime(path)
                outcomes["loaded"] += 1
            except GptsError as exc:
                assert "\n" not in str(exc)
                outcomes["GptsError"] += 1
            except _Hang:
                pytest.fail(f"case {case}: reading took over 10 s")
            except Exception as exc:  # noqa: BLE001 - the point is to catch anything else
                pytest.fail(f"case {case} (kind {kind}): {type(exc).__name__}: {exc}")
            finally:
                signal.alarm(0)
            peak = tracemalloc.get_traced_memory()[1]
            assert peak < 64 * 2**20, f"case {case}: {peak / 2**20:.0f} MiB allocated while reading"
    finally:
        tracemalloc.stop()
        signal.signal(signal.SIGALRM, old)
    assert outcomes["GptsError"] > 150, outcomes
    assert time.perf_counter() - start < 120
