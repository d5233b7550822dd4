#!/usr/bin/env bash
# A virtual environment with TRL for the side-by-side benchmarks (posttrain itself never imports trl).
#   bash benchmarks/peers/make_venv.sh [VERSION=1.16.0] [DIR=benchmarks/peers/.venv-trl]
# torch is installed first and pinned, so the CPU build is taken. TRL 1.12.0 is the last release with PPO,
# Nash-MD, XPO and MiniLLM; it needs `requests` beside it.
set -euo pipefail
VERSION=${1:-1.16.0}
DIR=${2:-"$(dirname "$0")/.venv-trl"}
python3 -m venv "$DIR"
"$DIR/bin/pip" install -q "torch==2.13.0"
"$DIR/bin/pip" install -q "trl==$VERSION" requests peft
"$DIR/bin/python" -c "import trl; print('TRL', trl.__version__, 'in', '$DIR')"
