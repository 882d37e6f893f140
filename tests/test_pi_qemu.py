"""Opt-in: the exported model on real aarch64 code (qemu-user, arm64 Debian root, the aarch64
onnxruntime wheel) decodes the same greedy tokens as on x86. Runs scripts/pi_qemu_check.sh.

Heavy (builds a ~300 MB arm64 root on first use, needs root, network to Debian and PyPI, and
binfmt_misc), so it only runs with GPTS_EDGE_QEMU=1; results of the recorded run are in
docs/mobile.md.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts/pi_qemu_check.sh"

pytestmark = [
    pytest.mark.optin,
    pytest.mark.skipif(
        os.environ.get("GPTS_EDGE_QEMU") != "1",
        reason="aarch64 check under qemu-user is heavy (arm64 root + wheels, minutes); "
        "set GPTS_EDGE_QEMU=1 to run it (needs root, debootstrap, qemu-user-static, network)",
    ),
]


def test_greedy_tokens_identical_x86_vs_aarch64_qemu(tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("debootstrap") is None:
        pytest.skip(
            "needs root and debootstrap (apt-get install debootstrap qemu-user-static binfmt-support)"
        )
    env = {**os.environ, "GPTS_EDGE_PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=3600, check=False
    )
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["n_tokens"] > 0
    assert result["model_file"] == "model.ort"
    assert result["tokens_equal"], result
