"""`gpts-edge data check` / `data stats` and `train --decontaminate` on small fixtures with
planted overlaps: an eval folder in the shared layout plus an `mc` file, and three sources."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from gpts_edge import contamination
from gpts_edge.cli import app
from gpts_edge.contamination import load_eval_index, normalized_words
from gpts_edge.errors import GptsError
from gpts_edge.tokenizer import EOT_ID, load_tokenizer
from gpts_edge.training.data import DocumentFilter, load_sources
from gpts_edge.training.datastats import check_sources, source_stats
from tests.conftest import run_cli

PIQA_GOAL = "How do I keep cut apples from turning brown in the lunch box?"
ARC_QUESTION = "Which gas do green plants take in from the air to make their own food?"
MC_CONTEXT = "The capital city of the small mountain country is known for"

_FILLER = [
    "river",
    "stone",
    "bread",
    "window",
    "lamp",
    "garden",
    "letter",
    "music",
    "horse",
    "cloud",
    "paper",
    "winter",
    "yellow",
]


def _filler(seed: int, words: int = 90) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(_FILLER) for _ in range(words)).capitalize() + "."


# Planted documents of source a.jsonl; the comment says which eval item each shares 13 words with.
A_DOCS = [
    _filler(1),
    # PIQA goal, with other case and punctuation: 13 words exactly
    _filler(2) + " My grandmother asked: HOW do I keep cut-apples from turning brown, in the lunch box?? "
    "Brush the slices with lemon! " + _filler(3),
    _filler(4),
    # 12 words of the PIQA goal only: no 13-gram overlap ('asked' and 'or' differ)
    _filler(5)
    + " Yesterday we asked: do I keep cut apples from turning brown in the lunch box, or not? "
    + _filler(6),
    # ARC question
    _filler(7) + " Teachers like to ask which gas do green plants take in from the air to make their "
    "own food, you know. " + _filler(8),
    _filler(9),
    # HellaSwag: 13 words across the context / ending boundary, the activity label left out
    _filler(10) + " A woman fills a kettle with water. She puts the kettle on the stove. " + _filler(11),
    # PIQA and ARC in one document: one document, two eval items
    f"{PIQA_GOAL} {ARC_QUESTION} " + _filler(12),
]
A_CONTAMINATED = [1, 4, 6, 7]
C_DOCS = [
    # the mc item's context + its first choice
    _filler(13)
    + " the capital city of the small mountain country is known for its old stone bridges. "
    + _filler(14),
    _filler(15),
]


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("eval")
    (d / "piqa").mkdir()
    piqa = [
        {
            "goal": PIQA_GOAL,
            "sol1": "Brush the slices with lemon juice before packing them in the box.",
            "sol2": "Brush the slices with motor oil before packing them in the box.",
        },
        {"goal": "dresser", "sol1": "replace drawer with bobby pin", "sol2": "finish with bobby pin"},
    ]
    (d / "piqa" / "valid.jsonl").write_text("".join(json.dumps(o) + "\n" for o in piqa))
    (d / "piqa" / "valid-labels.lst").write_text("0\n1\n")
    (d / "arc").mkdir()
    arc = {"question": ARC_QUESTION, "choices": ["oxygen", "carbon dioxide", "nitrogen"], "answer": 1}
    (d / "arc" / "arc_easy_test.jsonl").write_text(json.dumps(arc) + "\n")
    arc2 = {"question": "What is the unit of force?", "choices": ["newton", "joule"], "answer": 0}
    (d / "arc" / "arc_challenge_test.jsonl").write_text(json.dumps(arc2) + "\n")
    (d / "hellaswag").mkdir()
    (d / "hellaswag" / "hellaswag_val_full.txt").write_text(
        "Making tea: A woman fills a kettle with water. she\n0\n"
        "puts the kettle on the stove and waits for it to boil.\nthrows the kettle.\n"
        "sings a song.\nleaves.\n"
        "Rope skipping: A girl waits. she\n1\njumps.\nskips the rope twice.\nfalls.\nsits.\n"
    )
    return d


@pytest.fixture(scope="module")
def mc_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mc") / "towns.jsonl"
    item = {
        "context": MC_CONTEXT,
        "choices": ["its old stone bridges over the river", "nothing"],
        "answer": 0,
    }
    path.write_text(json.dumps(item) + "\n")
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("sources")
    (d / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in A_DOCS), encoding="utf-8")
    (d / "b.txt").write_text(_filler(20, 300), encoding="utf-8")
    with gzip.open(d / "c.jsonl.gz", "wt", encoding="utf-8") as fh:
        for t in C_DOCS:
            fh.write(json.dumps({"text": t}) + "\n")
    return {"a": d / "a.jsonl", "b": d / "b.txt", "c": d / "c.jsonl.gz"}


def _tokens(tokenizer_json: Path, texts: list[str]) -> int:
    tok = load_tokenizer(tokenizer_json)
    return sum(len(tok.encode(t).ids) for t in texts)


# --- normalisation and matching --------------------------------------------------------------


def test_normalisation_lowercases_and_splits_on_punctuation_and_symbols() -> None:
    words = normalized_words("Don't STOP—the well-known Café_au_lait costs $5.00! naïve “quoted”")
    assert [w.decode() for w in words] == [
        "don", "t", "stop", "the", "well", "known", "café", "au", "lait", "costs", "5", "00", "naïve", "quoted",
    ]  # fmt: skip


def test_eval_index_reads_every_task_and_counts_short_items(eval_dir, mc_file) -> None:
    index = load_eval_index([eval_dir, mc_file])
    s = index.summary()
    assert s["items_per_task"] == {"hellaswag": 2, "arc_easy": 1, "arc_challenge": 1, "piqa": 2, "mc": 1}
    assert s["items"] == 7
    # Shorter than 13 words with every choice: PIQA 'dresser', ARC 'unit of force', HellaSwag
    # 'Rope skipping' (its longest text, with 'skips the rope twice', is 10 words).
    assert s["short_items"] == 3
    assert s["short_items_per_task"] == {
        "hellaswag": 1,
        "arc_easy": 0,
        "arc_challenge": 1,
        "piqa": 1,
        "mc": 0,
    }
    assert s["n"] == 13 and len(s["fingerprint"]) == 16
    # One file named on its own: its task is recognised from its fields (and ARC's file name).
    alone = load_eval_index(eval_dir / "arc" / "arc_challenge_test.jsonl").summary()
    assert alone["items_per_task"] == {"arc_challenge": 1}
    assert load_eval_index(mc_file).summary()["items_per_task"] == {"mc": 1}


def test_a_hash_collision_is_not_reported_as_an_overlap(eval_dir, monkeypatch) -> None:
    index = load_eval_index(eval_dir)
    assert index.contaminated(A_DOCS[1])
    # Every word hashes alike: every 13-word window collides with every eval n-gram, and only
    # the word-by-word confirmation keeps clean text clean.
    monkeypatch.setattr(contamination, "hash", lambda w: 7, raising=False)
    collided = load_eval_index(eval_dir)
    assert not collided.contaminated(A_DOCS[0])
    assert collided.contaminated(A_DOCS[1])


# --- data check ------------------------------------------------------------------------------


def test_planted_overlaps_are_counted_per_source(eval_dir, mc_file, sources, tokenizer_json) -> None:
    specs = [str(sources["a"]), f"{sources['b']}:2", str(sources["c"])]
    report = check_sources(specs, [str(eval_dir), str(mc_file)])
    a, b, c = report["sources"]
    assert a["documents"] == len(A_DOCS) and a["contaminated_documents"] == len(A_CONTAMINATED)
    bad = [A_DOCS[i] for i in A_CONTAMINATED]
    assert a["contaminated_tokens"] == _tokens(tokenizer_json, bad)
    assert a["contaminated_bytes"] == sum(len(t.encode()) for t in bad)
    assert a["eval_items_hit"] == 3  # PIQA, ARC, HellaSwag (the last document holds two)
    assert [e["document"].rsplit("#", 1)[1] for e in a["examples"]] == ["1", "4", "6", "7"]
    assert {e["task"] for e in a["examples"]} == {"piqa", "arc_easy", "hellaswag"}
    assert b["source"] == str(sources["b"]) and b["documents"] == 1 and b["contaminated_documents"] == 0
    assert c["contaminated_documents"] == 1 and c["eval_items_hit"] == 1
    assert c["contaminated_tokens"] == _tokens(tokenizer_json, C_DOCS[:1])
    assert report["total"]["contaminated_documents"] == 5


def test_shorter_n_finds_the_twelve_word_near_miss(eval_dir, sources) -> None:
    at_13 = check_sources([str(sources["a"])], [str(eval_dir)], n=13)["sources"][0]
    at_12 = check_sources([str(sources["a"])], [str(eval_dir)], n=12)["sources"][0]
    assert at_13["contaminated_documents"] == 4
    assert at_12["contaminated_documents"] == 5  # document 3 shares exactly 12 words


def test_check_cli_prints_json_per_source(eval_dir, mc_file, sources) -> None:
    args = ["data", "check", "--data", str(sources["a"]), "--data", str(sources["c"])]
    args += ["--against", str(eval_dir), "--against", str(mc_file), "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report) == {"eval", "tokenizer", "sources", "total", "seconds"}
    assert [r["contaminated_documents"] for r in report["sources"]] == [4, 1]
    assert set(report["sources"][0]) >= {
        "source", "documents", "bytes", "contaminated_documents", "contaminated_tokens", "eval_items_hit",
    }  # fmt: skip
    text = CliRunner().invoke(app, args[:-1])
    assert text.exit_code == 0 and "a.jsonl" in text.stdout and "13-word overlaps" in text.stdout


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--against", "{tmp}/no-such-eval"], "no such file or folder"),
        (["--against", "{tmp}"], "no eval file found"),
        (["--against", "{eval}", "--n", "0"], "--n: expected a whole number"),
        (["--against", "{tmp}/odd.jsonl"], "not a known eval format"),
        (["--against", "{eval}", "--data", "{tmp}/missing.txt"], "no such file or directory"),
    ],
    ids=["missing-eval-dir", "empty-eval-dir", "n-zero", "unknown-eval-file", "missing-source"],
)
def test_bad_input_is_one_error_line_and_exit_2(tmp_path, eval_dir, sources, extra, needle) -> None:
    (tmp_path / "odd.jsonl").write_text('{"prompt": "x"}\n')
    extra = [e.format(tmp=tmp_path, eval=eval_dir) for e in extra]
    result = CliRunner().invoke(app, ["data", "check", "--data", str(sources["a"]), *extra])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr


def test_check_runs_as_a_process_without_torch(tmp_path, eval_dir, sources) -> None:
    # A `torch` that fails to import: the command must never touch it.
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise ImportError('torch is not installed here')\n")
    args = ["data", "check", "--data", str(sources["a"]), "--against", str(eval_dir), "--json"]
    proc = run_cli(*args, env={"PYTHONPATH": f"{tmp_path}:{Path(__file__).parent.parent}"})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["sources"][0]["contaminated_documents"] == 4


# --- data stats ------------------------------------------------------------------------------


def test_stats_count_documents_bytes_and_tokens(sources, tokenizer_json) -> None:
    report = source_stats([str(sources["a"]), str(sources["c"])])
    a, c = report["sources"]
    assert a["documents"] == len(A_DOCS) and c["documents"] == len(C_DOCS)
    assert a["bytes"] == sum(len(t.encode()) for t in A_DOCS)
    assert a["tokens"] == _tokens(tokenizer_json, A_DOCS)
    assert a["bytes_per_token"] == round(a["bytes"] / a["tokens"], 4)
    assert report["total"]["tokens"] == a["tokens"] + c["tokens"]
    result = CliRunner().invoke(app, ["data", "stats", "--data", str(sources["b"]), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["sources"][0]["documents"] == 1


def test_stats_of_a_missing_source_is_one_error_line(tmp_path) -> None:
    result = CliRunner().invoke(app, ["data", "stats", "--data", str(tmp_path / "nope.jsonl")])
    assert result.exit_code == 2 and result.stderr.startswith("error: ")
    assert len(result.stderr.strip().splitlines()) == 1


# --- train --decontaminate -------------------------------------------------------------------


def test_decontaminated_source_drops_documents_and_gets_its_own_cache(
    tmp_path, eval_dir, sources, tokenizer_json
) -> None:
    cache = tmp_path / "cache"
    index = load_eval_index(eval_dir)
    plain = load_sources([str(sources["a"])], tokenizer_json, cache, seq_len=16)[0]
    filtered = DocumentFilter("decontamination", index.fingerprint, index.contaminated)
    clean = load_sources([str(sources["a"])], tokenizer_json, cache, seq_len=16, doc_filter=filtered)[0]
    assert len(list(cache.iterdir())) == 2  # the un-decontaminated tokens are not reused
    eots = lambda s: int((np.concatenate([s.train, s.val]) == EOT_ID).sum())  # noqa: E731
    assert eots(plain) == len(A_DOCS) and eots(clean) == len(A_DOCS) - 4
    assert plain.dropped is None
    assert clean.dropped["documents"] == 4 and clean.dropped["checked"] == len(A_DOCS)
    assert clean.dropped["tokens"] == _tokens(tokenizer_json, [A_DOCS[i] for i in A_CONTAMINATED])
    # Another eval set is another key: a third cache entry.
    other = load_eval_index(eval_dir / "piqa" / "valid.jsonl")
    assert other.fingerprint != index.fingerprint
    load_sources(
        [str(sources["a"])],
        tokenizer_json,
        cache,
        seq_len=16,
        doc_filter=DocumentFilter("decontamination", other.fingerprint, other.contaminated),
    )
    assert len(list(cache.iterdir())) == 3


def test_train_decontaminate_logs_and_records_the_counts(
    tmp_path, eval_dir, sources, tokenizer_json, capsys
) -> None:
    pytest.importorskip("torch")
    from gpts_edge.training.data import prepare_source
    from gpts_edge.training.train import preset_config, train

    prepared = prepare_source(str(sources["c"]), tokenizer_json, tmp_path / "prepared")
    out = tmp_path / "run"
    tc = preset_config(
        "tiny",
        data=[str(sources["a"]), str(sources["b"]), str(prepared)],
        out=str(out),
        max_steps=2,
        eval_every=2,
        progress=False,
        decontaminate=str(eval_dir),
    )
    train(tc)
    log = capsys.readouterr().out
    assert f"{sources['a']}: dropped 4 of 8 documents" in log
    assert f"{sources['b']}: dropped 0 of 1 documents" in log
    assert f"{prepared}: a prepared token folder, not checked" in log
    state = json.loads(next((out / "checkpoints").glob("step-*/train_state.json")).read_text())
    d = state["decontamination"]
    assert d["against"] == str(eval_dir) and d["n"] == 13
    assert d["sources"][str(sources["a"])]["documents"] == 4
    assert d["sources"][str(sources["b"])] == {"checked": 1, "documents": 0, "tokens": 0}
    assert d["sources"][str(prepared)]["checked"] is None  # no text left to check


def test_train_with_a_missing_eval_set_is_one_error_line(tmp_path, sources) -> None:
    args = ["train", "--preset", "tiny", "--data", str(sources["a"]), "--out", str(tmp_path / "run")]
    result = CliRunner().invoke(app, [*args, "--max-steps", "1", "--decontaminate", str(tmp_path / "none")])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: --decontaminate ") and "no such file or folder" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_unknown_eval_file_in_library_call_is_a_gpts_error(tmp_path) -> None:
    bad = tmp_path / "x.jsonl"
    bad.write_text("[1, 2]\n")
    with pytest.raises(GptsError, match="expected JSON Lines of eval items"):
        load_eval_index(bad)
