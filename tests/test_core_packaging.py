"""A wheel built from the tree ships the default checkpoint and the three mapped subpackages."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO

# What the build needs; copying only these keeps the build out of the working tree (no build/ or
# egg-info next to other people's files) and skips examples/ (node_modules).
BUILD_INPUTS = ["pyproject.toml", "README.md", "gpts_edge", "export", "runtimes", "training"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in BUILD_INPUTS:
        p = REPO / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        elif p.is_file():
            shutil.copy2(p, src / name)
    out = tmp_path_factory.mktemp("wheel")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        ".",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        str(out),
        "-q",
    ]
    proc = subprocess.run(cmd, cwd=src, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheels = list(out.glob("gpts_edge-*.whl"))
    assert len(wheels) == 1
    return wheels[0]


@pytest.mark.slow
def test_wheel_contains_the_default_checkpoint(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ("model.safetensors", "config.json", "tokenizer.json", "generation_config.json"):
        assert f"gpts_edge/default_model/{f}" in names, f
    info = zipfile.ZipFile(wheel).getinfo("gpts_edge/default_model/model.safetensors")
    assert info.file_size == (REPO / "gpts_edge/default_model/model.safetensors").stat().st_size


@pytest.mark.slow
def test_wheel_maps_export_runtimes_training_into_gpts_edge(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for pkg in ("export", "runtimes", "training"):
        assert f"gpts_edge/{pkg}/__init__.py" in names, pkg
        assert not any(n.startswith(f"{pkg}/") for n in names), f"{pkg}/ installed as a top-level package"
    assert "gpts_edge/training/train.py" in names
    assert "gpts_edge/cli.py" in names
    entry = [n for n in names if n.endswith("entry_points.txt")]
    assert entry and "gpts-edge = gpts_edge.cli:main" in zipfile.ZipFile(wheel).read(entry[0]).decode()
