#!/usr/bin/env bash
# Install (scripts/setup.sh) and run the main job end to end:
#   export the default backbone (parity-checked)  [→ more steps as the pipeline grows]
# Usage: scripts/demo.sh [DATA]   DATA: root/<class>/*.jpg or root/train|val/<class>/*.jpg
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
edgetl export-backbone -o exports/backbone.onnx
