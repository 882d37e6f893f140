"""ORT-format export for mobile: ``model.ort`` + ``required_operators.config`` in a self-contained folder.

The ORT format is onnxruntime's flatbuffer serialization of an already optimized graph; the
mobile packages (onnxruntime-android, onnxruntime-objc/-c) load it without the protobuf parser and
the graph optimizers, and ``required_operators.config`` lists exactly the kernels the model uses,
which is the input to onnxruntime's reduced-size build (``build.sh --include_ops_by_config``).

Pipeline: the ONNX exporter writes ``model.onnx`` and its decode flavour ``model.decode.onnx``
into a scratch folder, onnxruntime's own converter (``onnxruntime.tools.convert_onnx_models_to_ort``)
turns each into its own ``.ort`` (``model.ort``, ``model.decode.ort``: the ORT format has no
external data, so each carries its weights) and lists the kernels of both in one
``required_operators.config``, and the result (plus config.json, tokenizer.json,
generation_config.json) replaces the output folder in one rename, so a reader never sees a
half-written export.
"""

from __future__ import annotations

import contextlib
import io
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from gpts_edge.constants import DECODE_SUFFIX, LAST_LOGITS_SUFFIX, ORT_MODEL_FILE, flavour_file
from gpts_edge.errors import GptsError
from gpts_edge.fileio import temp_dir_beside
from gpts_edge.outputs import FolderKind, check_output_dir, clean_stale, export_folder, onnx_files

ORT_FILE = ORT_MODEL_FILE
DECODE_ORT_FILE = flavour_file(ORT_FILE, DECODE_SUFFIX)  # the decode flavour, what generation steps with
# Where the decode flavour is unsupported (head_dim not a multiple of 16) the last-logits one.
LAST_LOGITS_ORT_FILE = flavour_file(ORT_FILE, LAST_LOGITS_SUFFIX)
OPS_CONFIG_FILE = "required_operators.config"
# Files of the ONNX export that stay behind: the graphs (converted instead), and
# onnxruntime-genai's config, which names model.onnx. Everything else (config.json,
# tokenizer.json, tokenizer_config.json, generation_config.json) is copied so the folder runs alone.
LEFT_BEHIND = tuple(sorted(n for n in onnx_files() if n.endswith(".onnx"))) + ("genai_config.json",)
ORT_KIND = FolderKind(
    "ORT export",
    ORT_FILE,
    frozenset(
        {ORT_FILE, DECODE_ORT_FILE, LAST_LOGITS_ORT_FILE, OPS_CONFIG_FILE, *onnx_files()} - set(LEFT_BEHIND)
    ),
)
# Mobile and Raspberry Pi targets are ARM; "arm" keeps the converter from baking x86-only
# layouts (NCHWc) into the fixed-optimization graph. The result still runs on x86.
DEFAULT_TARGET = "arm"


def _convert_here(onnx_path: Path, out_dir: Path, target_platform: str, log: Callable[[str], None]) -> None:
    """Run onnxruntime's converter in this process with the Fixed optimization style (what a plain
    CPU session on a phone wants) on ``onnx_path``, a graph or a folder of graphs (each becomes its
    own .ort); its chatty stdout goes to ``log`` line by line."""
    try:
        from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort
    except ImportError as exc:
        raise GptsError(f"ORT export needs onnxruntime with its tools package ({exc})") from None
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            convert_onnx_models_to_ort(
                onnx_path,
                output_dir=out_dir,
                optimization_styles=[OptimizationStyle.Fixed],
                target_platform=target_platform,
            )
    except Exception as exc:  # the converter raises bare Exceptions and onnxruntime's private types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise GptsError(
            f"{onnx_path}: onnxruntime could not convert it to ORT format ({first[:200]})"
        ) from None
    finally:
        for line in buf.getvalue().splitlines():
            if line.strip():
                log(f"  ort: {line.strip()}")


# The converter run in a child process with address-space randomization off. onnxruntime's hash
# maps are seeded by an address inside its library (abseil), so the order in which the converter
# serializes some tables, hence the .ort bytes (not what they compute), changes from one process to
# the next; with the library at a fixed address the same install writes the same bytes.
_CHILD = """
import sys
from pathlib import Path
import onnxruntime
from gpts_edge.errors import GptsError
from gpts_edge.export.ort import _convert_here

class _OneThread(onnxruntime.SessionOptions):  # no thread pool: one allocation order
    def __init__(self):
        super().__init__()
        self.intra_op_num_threads = 1
        self.inter_op_num_threads = 1

onnxruntime.SessionOptions = _OneThread  # the converter makes its own session options
try:
    _convert_here(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], print)
except GptsError as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(2)
"""


def _fixed_layout_prefix() -> list[str] | None:
    """``setarch ARCH -R`` where it works (Linux with util-linux, personality not blocked)."""
    setarch = shutil.which("setarch")
    if setarch is None or sys.platform != "linux":
        return None
    cmd = [setarch, platform.machine(), "-R"]
    try:
        ok = subprocess.run([*cmd, "true"], capture_output=True, timeout=30, check=False).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return None
    return cmd if ok else None


def _convert(onnx_path: Path, out_dir: Path, target_platform: str, log: Callable[[str], None]) -> bool:
    """Convert (see _convert_here); in a child process with a fixed address layout when the system
    allows it. Returns whether it did (the .ort bytes are then reproducible)."""
    prefix = _fixed_layout_prefix()
    if prefix is None:
        log("  ort: address randomization cannot be turned off here; .ort bytes may differ between exports")
        _convert_here(onnx_path, out_dir, target_platform, log)
    else:
        # The same arguments and environment every time (relative paths from the scratch folder,
        # no caller's variables, fixed str hashing): heap layout, hence pointer-keyed tables, too.
        cwd = out_dir.parent
        paths = [os.path.relpath(onnx_path, cwd), os.path.relpath(out_dir, cwd)]
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0", "LC_ALL": "C"}
        for name in ("LD_LIBRARY_PATH", "DYLD_LIBRARY_PATH"):  # how a custom onnxruntime is found
            if os.environ.get(name):
                env[name] = os.environ[name]
        if os.environ.get("PYTHONPATH"):
            env["PYTHONPATH"] = os.pathsep.join(
                os.path.abspath(p) for p in os.environ["PYTHONPATH"].split(os.pathsep)
            )
        args = [*prefix, sys.executable, "-c", _CHILD, *paths, target_platform]
        proc = subprocess.run(args, capture_output=True, text=True, check=False, cwd=cwd, env=env)
        for line in proc.stdout.splitlines():
            if line.strip():
                log(line.rstrip())
        if proc.returncode != 0 and "No module named 'gpts_edge'" in proc.stderr:
            # A source tree the caller put on sys.path, which a fresh interpreter does not see.
            log("  ort: the converter's child process cannot import gpts_edge; converting in-process")
            _convert_here(onnx_path, out_dir, target_platform, log)
            prefix = None
        elif proc.returncode != 0:
            errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
            last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
            raise GptsError(
                errors[-1][len("error: ") :]
                if errors
                else f"{onnx_path}: ORT conversion failed ({last[:200]})"
            )
    # The converter reports failures by printing and skipping the model, so check the outputs.
    if not (out_dir / ORT_FILE).is_file():
        raise GptsError(f"{onnx_path}: onnxruntime's converter wrote no {ORT_FILE} (see the log above)")
    return prefix is not None


def _find_ops_config(out_dir: Path) -> Path:
    # The converter names it after the input (model.required_operators.config) and, in older
    # releases, after the folder; accept whichever single one it wrote.
    found = sorted(out_dir.glob("*required_operators*.config"))
    if len(found) != 1:
        raise GptsError(
            f"{out_dir}: expected one required_operators config from onnxruntime's converter, "
            f"found {len(found)}"
        )
    return found[0]


def _write_ops_config(src: Path, dst: Path) -> None:
    # The converter's header names the scratch path it read; name the shipped file instead.
    body = [line for line in src.read_text().splitlines() if line.strip() and not line.startswith("#")]
    header = [
        f"# Generated from {ORT_FILE} by gpts-edge export --format ort (onnxruntime's converter).",
        "# Reduced build: ./build.sh --minimal_build --include_ops_by_config required_operators.config",
    ]
    dst.write_text("\n".join(header + body) + "\n")


def _prepare_output(output: str | Path, force: bool) -> Path:
    out = Path(output)
    if out.suffix == ".ort":
        raise GptsError(
            f"{out}: --format ort writes a folder (model.ort + sidecar files); pass a folder path"
        )
    check_output_dir(out, ORT_KIND, force=force)
    return out


def export_ort(
    model: str | Path | None,
    output_dir: str | Path,
    *,
    quantize: str = "none",
    target_platform: str = DEFAULT_TARGET,
    log: Callable[[str], None] = print,
    force: bool = False,
    decode_graph: bool = True,
) -> Path:
    """Export ``model`` (a checkpoint folder; None: the bundled one) to ``output_dir``/model.ort,
    with the decode flavour as ``model.decode.ort`` unless ``decode_graph`` is False.

    ``quantize`` is passed to the ONNX exporter (none | int8 | int4). Returns the .ort path.
    """
    from gpts_edge.export.onnx import MODEL_FILE, export_onnx

    if target_platform not in ("arm", "amd64"):
        raise GptsError(f"target_platform: expected arm or amd64, found {target_platform!r}")
    out = _prepare_output(output_dir, force)
    clean_stale(out)
    scratch = temp_dir_beside(out)
    try:
        onnx_dir = scratch / "onnx"
        ort_dir = scratch / "ort"
        onnx_dir.mkdir()
        ort_dir.mkdir()
        log("[ort 1/3] exporting ONNX")
        export_onnx(model, onnx_dir / MODEL_FILE, quantize=quantize, log=log, decode_graph=decode_graph)
        graphs = sorted(onnx_dir.glob("*.onnx"))
        log(f"[ort 2/3] converting {len(graphs)} graphs to ORT format (optimized for {target_platform})")
        # The whole folder at once: the decode flavour reads its weights from model.onnx beside
        # it, and one required_operators.config lists the kernels of both graphs.
        _convert(onnx_dir, ort_dir, target_platform, log)
        missing = [g.name for g in graphs if not (ort_dir / f"{g.stem}.ort").is_file()]
        if missing:
            raise GptsError(f"onnxruntime's converter skipped {', '.join(missing)} (see the log above)")
        # The new folder is swapped in whole: the old one (if any) moves aside first, so `out`
        # is only ever absent between two renames, never half-written.
        with export_folder(out, ORT_KIND, force=force) as final:
            for f in sorted(ort_dir.glob("*.ort")):
                os.replace(f, final / f.name)
            _write_ops_config(_find_ops_config(ort_dir), final / OPS_CONFIG_FILE)
            for f in sorted(onnx_dir.iterdir()):
                if f.is_file() and f.name not in LEFT_BEHIND:
                    shutil.copyfile(f, final / f.name)
            for f in final.iterdir():
                if f.name in ORT_KIND.owned:
                    f.chmod(0o644)  # mkstemp files are private; an app bundle needs them readable
            final.chmod(0o755)
            size = (final / ORT_FILE).stat().st_size
            log(f"[ort 3/3] writing {out} ({ORT_FILE}: {size:,} bytes)")
    except OSError as exc:
        raise GptsError(f"{out}: cannot write the ORT export ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out / ORT_FILE


def required_operators(folder: str | Path) -> list[tuple[str, int, str]]:
    """(domain, opset, op) for every kernel listed in ``folder``/required_operators.config."""
    path = Path(folder) / OPS_CONFIG_FILE
    if not path.is_file():
        raise GptsError(f"{path}: no such file (export with `gpts-edge export --format ort`)")
    ops = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        # "ai.onnx;23;Attention,MatMul,..." (type-reduced configs append {...} per op)
        try:
            domain, opset, names = line.split(";", 2)
            ops += [(domain, int(opset), n.split("{")[0].strip()) for n in names.split(",") if n.strip()]
        except ValueError:
            raise GptsError(f"{path}: line {line[:60]!r}: expected 'domain;opset;Op1,Op2'") from None
    return ops
