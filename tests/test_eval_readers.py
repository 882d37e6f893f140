"""Readers and templates of `gpts-edge eval`, on tiny hand-written fixtures of each format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpts_edge.errors import GptsError
from gpts_edge.evaluate import (
    hellaswag_capitalize_last_clause,
    hellaswag_preprocess,
    load_task,
    read_arc,
    read_hellaswag,
    read_mc,
    read_piqa,
)


def write_lines(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )
    return path


# Two HellaSwag items as the original jsonl holds them: one ActivityNet (ctx_b a lower-case clause),
# one WikiHow (markers, empty ctx_b).
HELLASWAG_JSONL = [
    {
        "activity_label": "Roof shingle removal",
        "ctx_a": "A man is sitting on a roof.",
        "ctx_b": "he",
        "endings": [
            "is using wrap to wrap a pair of skis.",
            "is ripping level tiles off.",
            "is holding a rubik's cube.",
            "starts pulling up roofing on a roof.",
        ],
        "label": 3,
    },
    {
        "activity_label": "Health",
        "ctx_a": "[header] How to use oils [title] Know what oils help. [step] Sage helps.",
        "ctx_b": "",
        "endings": ["[substeps] Basil works.", "Drink water.", "Run [title] fast.", "Sleep."],
        "label": 0,
    },
]


def hellaswag_six_lines(rows: list[dict]) -> list[str]:
    """The shared 6-line format, made as its README says: preprocess(label: ctx_a + " " + ctx_b)."""
    out = []
    for r in rows:
        ctx = r["ctx_a"] + (" " + r["ctx_b"] if r["ctx_b"] else "")
        out += [hellaswag_preprocess(r["activity_label"] + ": " + ctx), str(r["label"])]
        out += [hellaswag_preprocess(e) for e in r["endings"]]
    return out


def test_piqa_template_and_labels_file_beside_it(tmp_path: Path) -> None:
    data = write_lines(
        tmp_path / "valid.jsonl",
        [
            {"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat the lid"},
            {"goal": "Dry hair", "sol1": "use water", "sol2": "use a towel"},
        ],
    )
    (tmp_path / "valid-labels.lst").write_text("0\n1\n")
    items = read_piqa(data)
    assert [i.context for i in items] == ["Question: Open a jar\nAnswer:", "Question: Dry hair\nAnswer:"]
    assert items[1].choices == ("use water", "use a towel")
    assert [i.gold for i in items] == [0, 1]
    assert items[0].delimiter == " "


def test_piqa_label_count_mismatch_names_labels_file(tmp_path: Path) -> None:
    data = write_lines(tmp_path / "valid.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b"}] * 2)
    (tmp_path / "valid-labels.lst").write_text("0\n")
    with pytest.raises(GptsError, match=r"valid-labels\.lst: expected 2 labels"):
        read_piqa(data)


def test_piqa_bad_label_names_line(tmp_path: Path) -> None:
    data = write_lines(tmp_path / "valid.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b"}] * 2)
    (tmp_path / "valid-labels.lst").write_text("0\n2\n")
    with pytest.raises(GptsError, match=r"valid-labels\.lst:2: expected label 0 or 1, found '2'"):
        read_piqa(data)


def test_hellaswag_jsonl_builds_harness_query(tmp_path: Path) -> None:
    items = read_hellaswag(write_lines(tmp_path / "hellaswag_val.jsonl", HELLASWAG_JSONL))
    assert items[0].context == "Roof shingle removal: A man is sitting on a roof. He"
    assert items[0].gold == 3
    # [title] -> ". ", other markers dropped, double spaces collapsed, in context and endings; the
    # harness strips before dropping markers, so a leading "[substeps] " leaves a leading space.
    assert items[1].context == "Health: How to use oils. Know what oils help. Sage helps."
    assert items[1].choices == (" Basil works.", "Drink water.", "Run. fast.", "Sleep.")


def test_hellaswag_six_line_format_matches_jsonl_query(tmp_path: Path) -> None:
    txt = tmp_path / "hellaswag_val_full.txt"
    txt.write_text("\n".join(hellaswag_six_lines(HELLASWAG_JSONL)) + "\n", encoding="utf-8")
    from_txt = read_hellaswag(txt)
    from_jsonl = read_hellaswag(write_lines(tmp_path / "h.jsonl", HELLASWAG_JSONL))
    assert [i.context for i in from_txt] == [i.context for i in from_jsonl]
    assert [i.gold for i in from_txt] == [i.gold for i in from_jsonl]
    # A text line cannot start with the space a dropped leading marker leaves; the rest is equal.
    assert [i.choices for i in from_txt] == [tuple(c.strip() for c in i.choices) for i in from_jsonl]
    assert from_txt[1].where.endswith("hellaswag_val_full.txt:7")


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            "Clean and jerk: A lady walks. She bends down. the lady",
            "Clean and jerk: A lady walks. She bends down. The lady",
        ),
        ("Sumo: A cartoon is shown. two men", "Sumo: A cartoon is shown. Two men"),
        ("Swimming: men", "Swimming: Men"),  # ctx_a empty: the clause follows the label
        ("Health: How to rest. Sleep a lot.", "Health: How to rest. Sleep a lot."),  # WikiHow: no ctx_b
        (
            "Kite: A man in a Santa hat runs. the man in a Santa",
            "Kite: A man in a Santa hat runs. The man in a santa",
        ),
    ],
)
def test_hellaswag_last_clause_capitalised_like_str_capitalize(line: str, expected: str) -> None:
    assert hellaswag_capitalize_last_clause(line) == expected


def test_hellaswag_six_line_bad_gold_names_line(tmp_path: Path) -> None:
    lines = hellaswag_six_lines(HELLASWAG_JSONL)
    lines[7] = "x"
    txt = tmp_path / "h.txt"
    txt.write_text("\n".join(lines) + "\n")
    with pytest.raises(GptsError, match=r"h\.txt:8: expected the gold ending index 0\.\.3, found 'x'"):
        read_hellaswag(txt)


def test_hellaswag_six_line_truncated_file_is_an_error(tmp_path: Path) -> None:
    txt = tmp_path / "h.txt"
    txt.write_text("\n".join(hellaswag_six_lines(HELLASWAG_JSONL)[:-1]) + "\n")
    with pytest.raises(GptsError, match=r"h\.txt: expected 6 lines per item .* found 11 lines"):
        read_hellaswag(txt)


def test_arc_reads_3_and_5_choices_and_hf_layout(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "arc_easy_test.jsonl",
        [
            {
                "id": "a",
                "question": "Q1?",
                "choices": ["x", "y", "z"],
                "labels": ["A", "B", "C"],
                "answer": 2,
            },
            {
                "id": "b",
                "question": "Q2?",
                "choices": ["1", "2", "3", "4", "5"],
                "labels": list("ABCDE"),
                "answer": 4,
            },
            {
                "id": "c",
                "question": "Q3?",
                "choices": {"text": ["p", "q", "r", "s"], "label": ["1", "2", "3", "4"]},
                "answerKey": "2",
            },
        ],
    )
    items = read_arc(path)
    assert items[0].context == "Question: Q1?\nAnswer:"
    assert [len(i.choices) for i in items] == [3, 5, 4]
    assert [i.gold for i in items] == [2, 4, 1]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            '{"question": "Q?", "choices": ["a", "b"], "answer": 2}',
            r"field 'answer': expected an index in 0\.\.1, found 2",
        ),
        (
            '{"question": "Q?", "choices": ["a"], "answer": 0}',
            r"field 'choices': expected a list of at least 2 strings",
        ),
        ('{"choices": ["a", "b"], "answer": 0}', r"missing field 'question'"),
        ('{"question": "Q?", "choices": ["a", "b"], "answer": 0', r"not valid JSON"),
        ('["Q?"]', r"expected a JSON object, found list"),
    ],
)
def test_arc_malformed_line_is_named(tmp_path: Path, row: str, message: str) -> None:
    good = '{"question": "Q?", "choices": ["a", "b"], "answer": 0}'
    path = write_lines(tmp_path / "arc.jsonl", [good, row])
    with pytest.raises(GptsError, match=r"arc\.jsonl:2: " + message):
        read_arc(path)


def test_mc_generic_reads_context_choices_answer_and_delimiter(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "set.jsonl",
        [
            {"context": "2 + 2 =", "choices": ["4", "5"], "answer": 0},
            "",
            {"context": "Colour:", "choices": ["\nred", "\nblue"], "answer": 1, "delimiter": ""},
        ],
    )
    items = read_mc(path)
    assert [(i.context, i.choices, i.gold, i.delimiter) for i in items] == [
        ("2 + 2 =", ("4", "5"), 0, " "),
        ("Colour:", ("\nred", "\nblue"), 1, ""),
    ]
    assert items[1].where.endswith("set.jsonl:3")


def test_mc_answer_out_of_range_names_line(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "set.jsonl", [{"context": "c", "choices": ["a", "b"], "answer": True}])
    with pytest.raises(GptsError, match=r"set\.jsonl:1: field 'answer'"):
        read_mc(path)


def test_data_folder_in_shared_layout_finds_every_task(tmp_path: Path) -> None:
    write_lines(tmp_path / "piqa" / "valid.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b"}])
    (tmp_path / "piqa" / "valid-labels.lst").write_text("1\n")
    (tmp_path / "hellaswag").mkdir()
    (tmp_path / "hellaswag" / "hellaswag_val_full.txt").write_text(
        "\n".join(hellaswag_six_lines(HELLASWAG_JSONL))
    )
    arc = {"question": "Q?", "choices": ["a", "b", "c"], "answer": 1}
    write_lines(tmp_path / "arc" / "arc_easy_test.jsonl", [arc])
    write_lines(tmp_path / "arc" / "arc_challenge_test.jsonl", [arc, arc])
    counts = {t: len(load_task(t, tmp_path)) for t in ("piqa", "hellaswag", "arc_easy", "arc_challenge")}
    assert counts == {"piqa": 1, "hellaswag": 2, "arc_easy": 1, "arc_challenge": 2}


def test_missing_task_file_in_folder_lists_what_was_looked_for(tmp_path: Path) -> None:
    with pytest.raises(GptsError, match=r"no piqa file found \(looked for valid\.jsonl, piqa/valid\.jsonl\)"):
        load_task("piqa", tmp_path)
    with pytest.raises(GptsError, match="unknown task 'squad'"):
        load_task("squad", tmp_path)
