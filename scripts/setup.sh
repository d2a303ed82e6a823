#!/usr/bin/env bash
# Create .venv (if missing) and install edgetl with its dependencies into it. Idempotent.
# TORCH_SPEC overrides the torch pin (e.g. TORCH_SPEC="torch torchvision" for the newest).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$py" -m venv .venv
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  # shellcheck disable=SC2086
  .venv/bin/pip install -q ${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}
fi
.venv/bin/pip install -q -e ".[dev,lite]"
