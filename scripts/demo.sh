#!/usr/bin/env bash
# Install (scripts/setup.sh) and run the main job end to end on a photo folder:
#   export-backbone → train-head (embeds and caches, trains, fuses, verifies) → evaluate → predict
# Usage: scripts/demo.sh DATA   DATA: root/<class>/*.jpg or root/train|val/<class>/*.jpg
# Without DATA it exports and checks the default backbone only.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
edgetl export-backbone -o exports/backbone.onnx
if [ $# -eq 0 ]; then
  echo "give a photo folder to go on: scripts/demo.sh DATA" >&2
  exit 0
fi
data=$1
name=$(basename "$(cd "$data" && pwd)")
edgetl train-head "$data" --backbone exports/backbone.onnx -o "exports/$name"
edgetl evaluate "exports/$name/model.onnx" "$data"
mapfile -t some < <(find "$data" -type f \( -iname '*.jpg' -o -iname '*.jpeg' -o -iname '*.png' \) | sort | head -n 3)
edgetl predict "exports/$name/model.onnx" "${some[@]}" --top-k 2
echo "live: edgetl run --model exports/$name/model.onnx --camera 0"
