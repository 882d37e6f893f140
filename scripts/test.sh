#!/usr/bin/env bash
# Set up a virtual environment with every extra and run lint + the whole test suite.
# This is the README's test command; .ci/run calls it after installing system packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# constraints.txt pins torch to the CPU wheel; an unpinned torch pulls a multi-GB CUDA build.
python -m pip install -q -c constraints.txt -e ".[all]"
# JavaScript test dependencies (onnxruntime-web for the page, transformers.js + onnxruntime-node
# for the compatibility test). --ignore-scripts: onnxruntime-node's install script downloads
# binaries; the package already ships the linux-x64 one.
if command -v npm >/dev/null; then
  for d in examples/browser tests/js/transformersjs; do
    if [ -f "$d/package-lock.json" ]; then
      npm ci --prefix "$d" --ignore-scripts --no-audit --no-fund --loglevel=error
    fi
  done
fi
ruff check .
ruff format --check .
python -m pytest "$@"
