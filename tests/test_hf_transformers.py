"""The exported Hugging Face folder under real ``transformers`` (trust_remote_code): logits,
cached decoding, greedy ``generate``, bf16 round trip, and the model card's snippet verbatim.

Skipped as a whole only when transformers (or torch) is not installed.
"""

from __future__ import annotations

import ast
import os

import numpy as np
import pytest

pytest.importorskip("torch", reason="torch is not installed (pip install 'gpts-edge[export]')")
pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache  # noqa: E402

from gpts_edge.checkpoint import load_checkpoint  # noqa: E402
from gpts_edge.export.hf import CARD_SNIPPET, export_hf, import_hf  # noqa: E402
from gpts_edge.generation import generate_ids  # noqa: E402
from gpts_edge.sampling import SamplingOptions  # noqa: E402
from gpts_edge.torch_runtime import TorchRuntime  # noqa: E402

# Everything is local; never let a from_pretrained call try the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers.utils.logging.disable_progress_bar()

LOGIT_TOL = 1e-5  # absolute, fp32


@pytest.fixture(scope="session")
def hf_dirs(tiny_checkpoint, tmp_path_factory):
    """model name -> (our checkpoint dir (None = bundled), exported HF folder)."""
    root = tmp_path_factory.mktemp("hf_tf")
    return {
        "tiny": (tiny_checkpoint, export_hf(tiny_checkpoint, root / "tiny", log=lambda m: None)),
        "default": (None, export_hf(None, root / "default", log=lambda m: None)),
    }


_loaded: dict[str, tuple] = {}


def _pair(hf_dirs, name: str):
    """(our TorchRuntime, the transformers model in fp32) for one model, loaded once."""
    if name not in _loaded:
        ours, folder = hf_dirs[name]
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
        _loaded[name] = (TorchRuntime(ours), model.eval())
    return _loaded[name]


def _prompt(n: int, seed: int, batch: int = 1) -> torch.Tensor:
    # Ids from 1 so no prompt holds <|endoftext|> (id 0) by chance.
    return torch.randint(1, 4096, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["tiny", "default"])
def test_hf_fp32_logits_equal_torch_full_sequence(hf_dirs, name):
    rt, model = _pair(hf_dirs, name)
    ids = _prompt(48, seed=1, batch=2)
    with torch.no_grad():
        hf = model(ids).logits.numpy()
    ref = rt.forward_logits(ids.numpy())
    diff = float(np.abs(hf - ref).max())
    assert hf.shape == ref.shape == (2, 48, 4096)
    assert diff <= LOGIT_TOL, f"max |diff| {diff:.3g} (logit scale {np.abs(ref).max():.3g})"


@pytest.mark.parametrize("name", ["tiny", "default"])
def test_hf_left_padded_batch_logits_equal_torch_forward_logits(hf_dirs, name):
    rt, model = _pair(hf_dirs, name)
    ids = _prompt(20, seed=2, batch=2)
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    ids[0, :7] = 0
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        hf = model(ids, attention_mask=mask, position_ids=pos).logits.numpy()
    ref = rt.forward_logits(ids.numpy(), mask.numpy())
    real = mask.numpy().astype(bool)
    diff = float(np.abs(hf - ref)[real].max())
    assert diff <= LOGIT_TOL, f"max |diff| on real tokens {diff:.3g}"


@pytest.mark.parametrize("name", ["tiny", "default"])
def test_hf_cached_decoding_logits_equal_torch_cached_steps(hf_dirs, name):
    """Prefill + one token at a time through a DynamicCache, and the per-step scores of
    ``generate``, both against our runtime's cached ``step``."""
    rt, model = _pair(hf_dirs, name)
    ids = _prompt(30, seed=3)[0]
    ref, cache = rt.step(ids[:10].numpy(), rt.new_cache())
    refs = [ref]
    for t in ids[10:-1]:
        ref, cache = rt.step(np.array([int(t)]), cache)
        refs.append(ref)
    refs = np.stack(refs)

    with torch.no_grad():
        hf_cache = DynamicCache()
        out = model(ids[None, :10], cache=hf_cache, use_cache=True)
        steps = [out.logits[0, -1]]
        for t in ids[10:-1]:
            out = model(t.view(1, 1), cache=hf_cache, use_cache=True)
            steps.append(out.logits[0, -1])
    assert hf_cache.get_seq_length() == len(ids) - 1
    diff = float(np.abs(torch.stack(steps).numpy() - refs).max())
    assert diff <= LOGIT_TOL, f"manual DynamicCache decoding: max |diff| {diff:.3g}"

    with torch.no_grad():
        gen = model.generate(
            ids[None, :10],
            max_new_tokens=20,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    seq = gen.sequences[0].numpy()
    ref, cache = rt.step(seq[:10], rt.new_cache())
    refs = [ref]
    for t in seq[10:-1]:
        ref, cache = rt.step(np.array([t]), cache)
        refs.append(ref)
    scores = torch.stack(gen.logits, 1)[0].numpy()
    diff = float(np.abs(scores - np.stack(refs)[: len(scores)]).max())
    assert diff <= LOGIT_TOL, f"generate's cached logits: max |diff| {diff:.3g}"


@pytest.mark.parametrize("name", ["tiny", "default"])
@pytest.mark.parametrize(("penalty", "ngram"), [(1.0, 0), (1.1, 4)])
def test_hf_greedy_generate_equals_gpts_greedy_tokens(hf_dirs, name, penalty, ngram):
    rt, model = _pair(hf_dirs, name)
    prompt = [int(t) for t in _prompt(8, seed=4)[0]]
    opts = SamplingOptions(
        temperature=0.0, repetition_penalty=penalty, no_repeat_ngram_size=ngram, max_new_tokens=40
    )
    ours = list(generate_ids(rt, prompt, opts))
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=40,
            do_sample=False,
            repetition_penalty=penalty,
            no_repeat_ngram_size=ngram,
        )
    theirs = out[0, len(prompt) :].tolist()
    assert len(ours) > 0
    assert theirs == ours


def test_hf_left_padded_batch_generate_equals_gpts_greedy_per_prompt(hf_dirs):
    """Batched generate pads on the left; each row must still be our unpadded greedy run."""
    rt, model = _pair(hf_dirs, "tiny")
    tok = AutoTokenizer.from_pretrained(hf_dirs["tiny"][1], trust_remote_code=True)
    texts = ["Once upon a time", "The weather in the mountains today was cold and"]
    batch = tok(texts, return_tensors="pt", padding=True)
    assert batch["attention_mask"][0, 0] == 0  # the shorter prompt really is left-padded
    with torch.no_grad():
        out = model.generate(
            **batch, max_new_tokens=20, do_sample=False, repetition_penalty=1.0, no_repeat_ngram_size=0
        )
    opts = SamplingOptions(temperature=0.0, repetition_penalty=1.0, no_repeat_ngram_size=0, max_new_tokens=20)
    width = batch["input_ids"].shape[1]
    for row, text in enumerate(texts):
        ours = list(generate_ids(rt, rt.tokenizer.encode(text).ids, opts))
        assert out[row, width : width + len(ours)].tolist() == ours, text


def test_hf_tokenizer_matches_ours(hf_dirs):
    rt, _ = _pair(hf_dirs, "default")
    tok = AutoTokenizer.from_pretrained(hf_dirs["default"][1], trust_remote_code=True)
    text = "The future of AI is <|endoftext|> naïve café 🙂  two  spaces\n"
    ids = tok(text)["input_ids"]
    assert ids == rt.tokenizer.encode(text).ids
    assert tok.decode(ids) == text
    assert tok.eos_token_id == tok.bos_token_id == tok.pad_token_id == 0
    assert tok.padding_side == "left"


def test_hf_bf16_saved_folder_imports_to_fp32_checkpoint(hf_dirs, tmp_path):
    ours, folder = hf_dirs["tiny"]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.bfloat16)
    saved = tmp_path / "saved_bf16"
    model.save_pretrained(saved)
    AutoTokenizer.from_pretrained(folder, trust_remote_code=True).save_pretrained(saved)
    assert "bfloat16" in (saved / "config.json").read_text()

    out = import_hf(saved, tmp_path / "ckpt")
    got = load_checkpoint(out)
    want = load_checkpoint(ours)
    assert got.config == want.config
    assert set(got.weights) == set(want.weights)
    for name, w in want.weights.items():
        bf16 = torch.from_numpy(w).to(torch.bfloat16).float().numpy()
        assert got.weights[name].dtype == np.float32
        np.testing.assert_array_equal(got.weights[name], bf16, err_msg=name)
    # A bf16 model still loads and runs in transformers after the trip through our format.
    reexported = export_hf(out, tmp_path / "again", log=lambda m: None)
    again = AutoModelForCausalLM.from_pretrained(reexported, trust_remote_code=True)
    with torch.no_grad():
        assert torch.isfinite(again(_prompt(5, seed=5)).logits).all()


def test_hf_card_snippet_runs_verbatim_on_the_bundled_model(hf_dirs, capsys):
    pytest.importorskip(
        "accelerate", reason="accelerate is not installed (the snippet's device_map='auto' needs it)"
    )
    folder = hf_dirs["default"][1]
    readme = (folder / "README.md").read_text()
    assert CARD_SNIPPET.replace("PATH", '"PATH/TO/THIS/FOLDER"') in readme
    exec(compile(CARD_SNIPPET, "model_card_snippet", "exec"), {"PATH": str(folder)})
    printed = capsys.readouterr().out.strip()
    assert printed.startswith("The future of AI is")
    assert len(printed) > len("The future of AI is") + 20, printed
    with capsys.disabled():
        print(f"\n[card snippet, transformers {transformers.__version__}] {printed!r}")


def test_hf_remote_code_imports_only_torch_and_transformers(hf_dirs):
    """The folder must work where gpts_edge is not installed."""
    allowed = {"torch", "transformers"}
    for name in ("modeling_gpts.py", "configuration_gpts.py"):
        tree = ast.parse((hf_dirs["tiny"][1] / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = set() if node.level else {node.module.split(".")[0]}
            else:
                continue
            assert roots <= allowed, f"{name} line {node.lineno} imports {sorted(roots - allowed)}"
