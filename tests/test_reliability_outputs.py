"""The overwrite rules (gpts_edge/outputs.py) for every writer: no user file deleted, a folder
export swapped in whole, stale temp files of killed writers cleaned, unreadable files named."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpts_edge.errors import GptsError
from gpts_edge.outputs import CHECKPOINT_KIND, STALE_AFTER_S, clean_stale, export_folder
from tests.conftest import REPO

pytest.importorskip("onnx")
pytest.importorskip("gguf")


def quiet(_m: str) -> None:
    pass


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def onnx_export(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gpts_edge.export.onnx import export_onnx

    return export_onnx(tiny_checkpoint, tmp_path_factory.mktemp("onnx") / "model.onnx", log=quiet).parent


# --- folders: refuse, force, swap ------------------------------------------------------------------


def test_force_replaces_only_the_exports_files_and_keeps_the_users(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    from gpts_edge.export.hf import export_hf

    out = tmp_path / "hf"
    (out / "photos").mkdir(parents=True)
    (out / "photos" / "cat.jpg").write_bytes(b"\xff\xd8 a cat")
    (out / "README.md").write_text("my readme, a name the export also writes")
    with pytest.raises(GptsError, match=f"{out}: folder is not empty and is not a previous"):
        export_hf(tiny_checkpoint, out, log=quiet)
    assert (out / "README.md").read_text().startswith("my readme")
    out.chmod(0o700)
    export_hf(tiny_checkpoint, out, log=quiet, force=True)
    assert (out / "photos" / "cat.jpg").read_bytes() == b"\xff\xd8 a cat"
    assert out.stat().st_mode & 0o777 == 0o700  # a private folder stays private
    assert (out / "modeling_gpts.py").is_file() and "my readme" not in (out / "README.md").read_text()
    # Now it is a previous export with a foreign entry: still refused without --force.
    with pytest.raises(GptsError, match=r"not part of a Hugging Face export \(photos\)"):
        export_hf(tiny_checkpoint, out, log=quiet)


def test_import_refuses_a_folder_of_other_files_and_replaces_a_previous_checkpoint(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    from gpts_edge.export.gguf import export_gguf, import_gguf

    gguf_file = export_gguf(tiny_checkpoint, tmp_path / "m.gguf", log=quiet)
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "data.csv").write_text("1,2")
    with pytest.raises(GptsError, match="not a previous checkpoint"):
        import_gguf(gguf_file, out, log=quiet)
    assert tree(out) == {"data.csv": b"1,2"}
    shutil.rmtree(out)
    shutil.copytree(tiny_checkpoint, out)
    (out / "generation_config.json").write_text("{}")
    import_gguf(gguf_file, out, log=quiet)  # a previous checkpoint: replaced without --force
    assert (out / "generation_config.json").read_text() != "{}"
    assert sorted(p.name for p in out.iterdir()) == sorted(CHECKPOINT_KIND.owned)


def test_onnx_folder_reexport_drops_its_own_stale_flavours(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from gpts_edge.export.onnx import export_onnx

    out = tmp_path / "onnx"
    export_onnx(tiny_checkpoint, out, log=quiet, last_logits_graph=True)
    assert (out / "model.last_logits.onnx").is_file()
    export_onnx(tiny_checkpoint, out, log=quiet)
    assert not (out / "model.last_logits.onnx").exists() and (out / "model.onnx").is_file()


def test_a_failed_folder_export_leaves_the_old_one_byte_identical(
    onnx_export: Path, tiny_checkpoint_plain: Path, tmp_path: Path, monkeypatch
) -> None:
    import gpts_edge.fileio as fileio
    from gpts_edge.export.onnx import export_onnx

    out = shutil.copytree(onnx_export, tmp_path / "onnx")
    before = tree(out)

    def interrupted(new: Path, target: Path) -> None:
        raise KeyboardInterrupt  # Ctrl-C after every file of the new export is written

    monkeypatch.setattr(fileio, "replace_dir", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(tiny_checkpoint_plain, out, log=quiet)
    assert tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]  # no temp folder left behind


def test_kill_9_during_a_reexport_leaves_a_loadable_export(
    onnx_export: Path, tiny_checkpoint_plain: Path, tmp_path: Path
) -> None:
    """A real SIGKILL while the new export is written: the folder is the old export, whole; the
    next export cleans the killed one's temp folder."""
    from gpts_edge.export.onnx import export_onnx
    from gpts_edge.runtimes.onnx import OnnxRuntime

    out = shutil.copytree(onnx_export, tmp_path / "onnx")
    before = tree(out)
    code = (
        "import sys, time\n"
        "import gpts_edge.outputs as o\n"
        "from gpts_edge.export.onnx import export_onnx\n"
        "real = o.atomic_dir\n"
        "def slow(out, mode=None):\n"
        "    cm = real(out, mode)\n"
        "    class Slow:\n"
        "        def __enter__(self):\n"
        "            self.tmp = cm.__enter__(); return self.tmp\n"
        "        def __exit__(self, *e):\n"
        "            print('WRITTEN', flush=True); time.sleep(60)\n"
        "    return Slow()\n"
        "o.atomic_dir = slow\n"
        f"export_onnx({str(tiny_checkpoint_plain)!r}, {str(out)!r}, log=lambda m: None)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "WRITTEN"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert tree(out) == before
    OnnxRuntime(out)  # loads
    left = [p.name for p in tmp_path.iterdir() if p.name != "onnx"]
    assert left and all(n.startswith(".onnx.tmp-p") for n in left)  # the killed writer's
    export_onnx(tiny_checkpoint_plain, out, log=quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]
    assert tree(out) != before


# --- stale temp files --------------------------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temp_entries_of_dead_writers_are_cleaned_live_and_recent_ones_kept(tmp_path: Path) -> None:
    target = tmp_path / "m.gguf"
    dead, live = _dead_pid(), os.getppid()
    entries = {
        f".m.gguf.p{dead}.abc123de.tmp": True,  # atomic_file of a dead process
        f".m.gguf.p{live}.def456gh.tmp": False,  # of a live one
        ".m.gguf.zz9x_abc.tmp": None,  # older naming, no pid: by age
        f".m.gguf.tmp-p{dead}-q1q1q1q1": True,
        f".m.gguf.tok-p{dead}-q2q2q2q2": True,
        ".m.gguf.old.gguf.tmp": False,  # not our shape of name
        ".m.gguf2.p1.abcdefgh.tmp": False,  # another target's
        ".m.gguf.notes": False,  # not a temp name
    }
    for name in entries:
        (tmp_path / name).write_bytes(b"x")
    old = time.time() - STALE_AFTER_S - 10
    os.utime(tmp_path / ".m.gguf.zz9x_abc.tmp", (old, old))
    removed = {p.name for p in clean_stale(target)}
    assert removed == {n for n, gone in entries.items() if gone is not False}
    (tmp_path / ".m.gguf.newnew12.tmp").write_bytes(b"x")  # recent, no pid: a writer may be running
    assert clean_stale(target) == []


def test_a_swap_killed_between_its_renames_gets_the_old_export_back(tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    old = tmp_path / f".ckpt.old-{_dead_pid()}"
    old.mkdir()
    (old / "model.safetensors").write_bytes(b"old weights")
    clean_stale(out)
    assert (out / "model.safetensors").read_bytes() == b"old weights" and not old.exists()


def test_export_folder_cleans_the_stale_temp_of_a_killed_export(tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    stale = tmp_path / f".ckpt.tmp-p{_dead_pid()}-abcdefgh"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    with export_folder(out, CHECKPOINT_KIND) as tmp:
        (tmp / "model.safetensors").write_bytes(b"whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


# --- files: suffix and format ----------------------------------------------------------------------


def test_gguf_output_needs_the_suffix_and_never_overwrites_another_format(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    from gpts_edge.export.gguf import export_gguf

    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    with pytest.raises(GptsError, match="expected a file name ending in .gguf"):
        export_gguf(tiny_checkpoint, notes, log=quiet)
    fake = tmp_path / "fake.gguf"
    fake.write_text("not gguf")
    with pytest.raises(GptsError, match="exists and is not a GGUF file"):
        export_gguf(tiny_checkpoint, fake, log=quiet)
    assert notes.read_text() == "mine" and fake.read_text() == "not gguf"
    export_gguf(tiny_checkpoint, fake, log=quiet, force=True)
    assert fake.read_bytes()[:4] == b"GGUF"


def test_onnx_file_output_never_replaces_someone_elses_sidecars(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    from gpts_edge.export.onnx import export_onnx

    (tmp_path / "config.json").write_text('{"mine": true}')
    with pytest.raises(GptsError, match="already holds config.json"):
        export_onnx(tiny_checkpoint, tmp_path / "model.onnx", log=quiet)
    assert (tmp_path / "config.json").read_text() == '{"mine": true}'


def test_tokenizer_output_refuses_a_json_that_is_not_a_tokenizer(tmp_path: Path) -> None:
    from gpts_edge.tokenizer import check_tokenizer_output

    other = tmp_path / "package.json"
    other.write_text('{"name": "app"}')
    with pytest.raises(GptsError, match="exists and is not a tokenizers tokenizer.json"):
        check_tokenizer_output(other)
    check_tokenizer_output(other, force=True)


# --- unreadable files (simulated: the tests run as root, whom chmod 000 does not stop) ---------------


def _deny(monkeypatch, denied: Path) -> None:
    """Reading ``denied`` (a file, or anything below a folder) raises PermissionError."""
    import builtins

    real_open, real_read_text, real_scandir = builtins.open, Path.read_text, os.scandir

    def blocked(p) -> bool:
        p = Path(os.fsdecode(p)) if not isinstance(p, int) else None
        return p is not None and (p == denied or denied in p.parents)

    def fake_open(file, *a, **k):
        if blocked(file):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *a, **k)

    def fake_read_text(self, *a, **k):
        if blocked(self):
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_text(self, *a, **k)

    def fake_scandir(path="."):
        if blocked(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(Path, "read_text", fake_read_text)
    monkeypatch.setattr(os, "scandir", fake_scandir)


@pytest.mark.parametrize(
    "name", ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "."]
)
def test_unreadable_checkpoint_files_are_named_as_unreadable(
    name: str, tiny_checkpoint: Path, monkeypatch
) -> None:
    from gpts_edge.inspect import describe

    denied = (tiny_checkpoint / name).resolve()
    _deny(monkeypatch, denied)
    with pytest.raises(GptsError) as err:
        describe(tiny_checkpoint)
    assert f"{denied}: cannot read (Permission denied)" in str(err.value)
    assert "not found" not in str(err.value)


def test_unreadable_gguf_and_export_cache_weights_are_named(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch
) -> None:
    from gpts_edge.api import checkpoint_hash
    from gpts_edge.export.gguf import export_gguf
    from gpts_edge.gguf_format import read_gguf

    gguf_file = export_gguf(tiny_checkpoint, tmp_path / "m.gguf", log=quiet)
    _deny(monkeypatch, gguf_file)
    with pytest.raises(GptsError, match=f"{gguf_file}: cannot read"):
        read_gguf(gguf_file)
    monkeypatch.undo()
    weights = tiny_checkpoint / "model.safetensors"
    _deny(monkeypatch, weights)
    with pytest.raises(GptsError, match=f"{weights}: cannot read"):
        checkpoint_hash(tiny_checkpoint)


# --- info on every format ------------------------------------------------------------------------------


def test_info_describes_onnx_folders_onnx_files_and_gguf(
    tiny_checkpoint: Path, onnx_export: Path, tmp_path: Path
) -> None:
    from gpts_edge.config import ModelConfig
    from gpts_edge.export.gguf import export_gguf
    from gpts_edge.inspect import describe

    want = ModelConfig.load(tiny_checkpoint / "config.json")
    ckpt = describe(tiny_checkpoint)
    gguf_file = export_gguf(tiny_checkpoint, tmp_path / "m.gguf", quant="q8_0", log=quiet)
    for path, fmt in [
        (onnx_export, "ONNX export"),
        (onnx_export / "model.onnx", "ONNX export"),
        (gguf_file, "GGUF file (arch gpts, tensors "),
    ]:
        d = describe(path)
        assert d["format"].startswith(fmt)
        assert "Q8_0" in d["format"] or fmt != "GGUF file (arch gpts, tensors "
        assert d["parameters"] == ckpt["parameters"] == want.num_parameters
        assert d["config"] == want.to_hf_dict()
        assert d["files"][Path(d["checkpoint"]).name] == Path(d["checkpoint"]).stat().st_size
    assert set(describe(onnx_export)["files"]) >= {"model.onnx", "config.json", "tokenizer.json"}
