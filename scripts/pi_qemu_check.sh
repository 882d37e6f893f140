#!/usr/bin/env bash
# Run the exported model on real aarch64 code under qemu-user and check that greedy decoding
# gives the same tokens as on this (x86_64) machine.
#
#   sudo scripts/pi_qemu_check.sh [MODEL_FOLDER]
#
# MODEL_FOLDER: an exported folder (model.ort or model.onnx + config.json + tokenizer.json);
# default: export the bundled model with `gpts-edge export --format ort` into the work dir.
#
# What it does (each step is skipped when its result is already there):
#   1. debootstrap --foreign an arm64 Debian bookworm root, then run its second stage through
#      qemu-aarch64-static (binfmt_misc);
#   2. pip download the manylinux aarch64 wheels of onnxruntime (the host's version), numpy and
#      tokenizers for the root's Python, and install them into a venv inside the root, offline;
#   3. run examples/raspberry-pi/generate.py --greedy --json on x86 (host venv) and inside the
#      arm64 root, and compare the token ids.
#
# Needs: root, network to deb.debian.org and PyPI, Debian packages debootstrap, qemu-user-static,
# binfmt-support. Heavy (the root is ~300 MB; the first run takes minutes); the CPU work runs
# under nice -n 19. Environment:
#   GPTS_EDGE_ARM64_ROOT  where the arm64 root lives (default ~/.cache/gpts-edge/arm64-bookworm)
#   GPTS_EDGE_PYTHON      host Python with gpts-edge installed (default: python3 on PATH)
#   PROMPT, MAX_NEW_TOKENS   what to generate (default "Once upon a time", 40)
# Exit status: 0 tokens equal, 1 tokens differ, 2 setup failed.

set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ROOT="${GPTS_EDGE_ARM64_ROOT:-$HOME/.cache/gpts-edge/arm64-bookworm}"
PY="${GPTS_EDGE_PYTHON:-python3}"
PROMPT="${PROMPT:-Once upon a time}"
MAX_NEW_TOKENS="${MAX_NEW_TOKENS:-40}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SUITE=bookworm
NICE=(nice -n 19)

die() { echo "pi_qemu_check: error: $*" >&2; exit 2; }
log() { echo "pi_qemu_check: $*" >&2; }

[ "$(id -u)" = 0 ] || die "must run as root (debootstrap and chroot)"
command -v debootstrap >/dev/null || die "debootstrap not found (apt-get install debootstrap)"
[ -x /usr/bin/qemu-aarch64-static ] || die "qemu-aarch64-static not found (apt-get install qemu-user-static)"
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null \
        || die "binfmt_misc is not mounted and cannot be mounted here"
fi
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    update-binfmts --enable qemu-aarch64 2>/dev/null || die "cannot register qemu-aarch64 with binfmt_misc"
fi

start=$(date +%s)

# 1. arm64 root -------------------------------------------------------------------------------
if [ ! -e "$ROOT/.gpts-stage2-done" ]; then
    log "debootstrap (first stage) into $ROOT"
    mkdir -p "$ROOT"
    "${NICE[@]}" debootstrap --foreign --arch=arm64 --variant=minbase \
        --include=python3,python3-venv,ca-certificates "$SUITE" "$ROOT" "$MIRROR" >&2
    # Without the F (fix-binary) binfmt flag the interpreter must exist inside the root.
    install -D -m 755 /usr/bin/qemu-aarch64-static "$ROOT/usr/bin/qemu-aarch64-static"
    log "debootstrap (second stage, under qemu)"
    "${NICE[@]}" chroot "$ROOT" /debootstrap/debootstrap --second-stage >&2
    touch "$ROOT/.gpts-stage2-done"
fi
# /proc and /sys are deliberately not bound into the root: onnxruntime's cpuinfo then warns
# "cpuinfo_initialize failed" and uses its baseline aarch64 (NEON) kernels, whereas with the
# host's (x86) /proc and /sys both bound it crashed under qemu-user (SIGSEGV). A real Pi has its own.
arm_py_tag=$(chroot "$ROOT" /usr/bin/python3 -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')
[ "$(chroot "$ROOT" /usr/bin/uname -m)" = aarch64 ] || die "the root does not run as aarch64"

# 2. wheels + venv inside the root ----------------------------------------------------------------
ORT_VERSION=$("$PY" -c 'import onnxruntime; print(onnxruntime.__version__)')
if [ ! -e "$ROOT/opt/venv/.gpts-ort-$ORT_VERSION" ]; then
    log "downloading aarch64 wheels (onnxruntime==$ORT_VERSION, cp$arm_py_tag)"
    rm -rf "$ROOT/opt/wheels" "$ROOT/opt/venv"
    mkdir -p "$ROOT/opt/wheels"
    "$PY" -m pip download --quiet --dest "$ROOT/opt/wheels" --only-binary=:all: \
        --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux_2_28_aarch64 \
        --python-version "$arm_py_tag" --implementation cp \
        "onnxruntime==$ORT_VERSION" numpy tokenizers >&2
    log "installing them into /opt/venv inside the root (under qemu)"
    "${NICE[@]}" chroot "$ROOT" /usr/bin/python3 -m venv /opt/venv >&2
    "${NICE[@]}" chroot "$ROOT" /opt/venv/bin/pip install --quiet --no-index --find-links /opt/wheels \
        onnxruntime numpy tokenizers >&2
    touch "$ROOT/opt/venv/.gpts-ort-$ORT_VERSION"
fi

# 3. model, x86 run, aarch64 run, compare ---------------------------------------------------------
WORK="$ROOT/opt/gpts-check"
rm -rf "$WORK"
mkdir -p "$WORK"
if [ $# -ge 1 ]; then
    [ -e "$1/config.json" ] || die "$1: not an exported folder (no config.json)"
    cp -r "$1" "$WORK/model"
else
    log "exporting the bundled model (--format ort)"
    "$PY" -m gpts_edge.cli export --format ort -o "$WORK/model" >&2
fi
cp "$HERE/examples/raspberry-pi/generate.py" "$WORK/generate.py"

log "greedy on x86_64 ($(uname -m))"
"${NICE[@]}" "$PY" "$WORK/generate.py" "$WORK/model" "$PROMPT" --greedy --json \
    --max-new-tokens "$MAX_NEW_TOKENS" > "$WORK/x86.json"
log "greedy on aarch64 (qemu-user)"
arm_start=$(date +%s)
"${NICE[@]}" chroot "$ROOT" /opt/venv/bin/python /opt/gpts-check/generate.py /opt/gpts-check/model \
    "$PROMPT" --greedy --json --max-new-tokens "$MAX_NEW_TOKENS" > "$WORK/aarch64.json"
arm_s=$(( $(date +%s) - arm_start ))

"$PY" - "$WORK/x86.json" "$WORK/aarch64.json" "$arm_s" "$(( $(date +%s) - start ))" <<'EOF'
import json, sys
x, a = (json.load(open(p)) for p in sys.argv[1:3])
same = x["tokens"] == a["tokens"]
first_diff = next((i for i, (p, q) in enumerate(zip(x["tokens"], a["tokens"])) if p != q), None)
print(json.dumps({
    "tokens_equal": same, "n_tokens": len(x["tokens"]), "first_difference": first_diff,
    "model_file": x["model"], "onnxruntime_x86": x["onnxruntime"], "onnxruntime_aarch64": a["onnxruntime"],
    "x86_decode_tokens_per_s": round(x["decode_tokens_per_s"], 1),
    "qemu_aarch64_decode_tokens_per_s": round(a["decode_tokens_per_s"], 1),
    "aarch64_run_s": int(sys.argv[3]), "total_s": int(sys.argv[4]),
    "text": x["text"],
}, indent=1))
sys.exit(0 if same else 1)
EOF
