"""Hub data sources: the card's five-source mix is named, and without `datasets` or a network the
trainer fails at once with a clear message (never a hang, never a half-written cache)."""

from __future__ import annotations

import socket
import sys
import types

import pytest

from gpts_edge.errors import GptsError
from gpts_edge.training import data


def test_card_mix_expands_to_the_five_card_sources_with_their_weights() -> None:
    specs = data.expand_card_mix(["card-mix", "local.txt:2"])
    weights = {s.split(":")[1]: float(s.split(":")[2]) for s in specs[:5]}
    assert weights == {
        "fineweb-edu": 0.15,
        "cosmopedia-v2": 0.30,
        "fineweb-hq": 0.20,
        "ultra-fineweb-qa": 0.20,
        "ultra-fineweb-multi-style": 0.15,
    }
    assert specs[5] == "local.txt:2"
    assert data.parse_data_spec(specs[1]) == ("card:cosmopedia-v2", 0.30)


def test_hub_source_without_datasets_is_a_clear_error(tmp_path, tokenizer_json, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(GptsError, match=r"card:fineweb-edu: hub sources need the `datasets` package"):
        data.prepare_source("card:fineweb-edu", tokenizer_json, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_hub_source_without_network_fails_fast_and_writes_nothing(
    tmp_path, tokenizer_json, monkeypatch
) -> None:
    monkeypatch.setitem(sys.modules, "datasets", types.ModuleType("datasets"))

    def unreachable(*args, **kwargs):
        raise OSError("[Errno 101] Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    with pytest.raises(
        GptsError, match=r"hf:HuggingFaceFW/fineweb-edu#sample-10BT: the Hugging Face hub is unreachable"
    ):
        data.prepare_source("hf:HuggingFaceFW/fineweb-edu#sample-10BT", tokenizer_json, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_unknown_card_source_names_the_choices(tmp_path, tokenizer_json) -> None:
    with pytest.raises(GptsError, match="unknown card source; choose from fineweb-edu"):
        data.prepare_source("card:nonsense", tokenizer_json, tmp_path / "cache")
