#!/usr/bin/env bash
# Install posttrain into .venv and run the quickstart (results under runs/quickstart/).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip install -q "torch==2.13.0"   # pinned: the CPU build here, never a multi-GB CUDA build by accident
pip install -q -e .
posttrain quickstart "$@"
