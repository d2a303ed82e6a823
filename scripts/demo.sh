#!/usr/bin/env bash
# The main job, end to end. Installs into .venv/ (scripts/setup.sh; a second run skips what is done),
# then: train-head (exports the backbone on first use, embeds, trains, fuses and verifies one
# model.onnx) → evaluate (on photos the model never saw) → predict → run on a video, headless.
#
#   bash scripts/demo.sh            the bundled sample: samples/pets (Tigger, Misty and neither)
#   bash scripts/demo.sh PHOTOS     your photos: PHOTOS/<class>/*.jpg or PHOTOS/train|val/<class>/*.jpg
set -euo pipefail
caller=$(pwd)
root=$(cd "$(dirname "$0")/.." && pwd)
if [ $# -gt 0 ]; then
  case "$1" in /*) data=$1 ;; *) data=$caller/$1 ;; esac
  [ -d "$data" ] || { echo "demo: not a folder: $1" >&2; exit 1; }
  data=$(cd "$data" && pwd)
  clip_from=()  # the validation photos, chosen below once the split is known
else
  data=$root/samples/pets
  clip_from=("$root/samples/pets-held-back")
fi
cd "$root"
bash scripts/setup.sh demo  # only what the main job needs (no Ray, moto, pytest)
export PATH="$root/.venv/bin:$PATH"
out=exports/$(basename "$data")
started=$(date +%s)

echo "== train: edgetl train-head $data -o $out"
edgetl train-head "$data" -o "$out"

echo "== evaluate (photos the model was not trained on)"
edgetl evaluate "$out/model.onnx" "$data"

if [ ${#clip_from[@]} -eq 0 ]; then  # your photos: the validation ones (never trained on), at most 8
  mapfile -t clip_from < <(.venv/bin/python - "$data" "$out" <<'PY'
import json, sys
from pathlib import Path
sys.stdout.reconfigure(errors="surrogateescape")  # file names that are not UTF-8 print as their bytes
data, out = Path(sys.argv[1]), Path(sys.argv[2])
split = out / "split.json"
val = [data / p for p in json.loads(split.read_text())["val"]] if split.exists() else sorted((data / "val").rglob("*.jpg"))
for p in val[:8]:
    print(p)
PY
)
fi
echo "== predict"
edgetl predict "$out/model.onnx" "${clip_from[@]}" --top-k 2

echo "== run on a video made from those photos (headless: one JSON line per frame; annotated copy saved)"
.venv/bin/python scripts/make_video.py "${clip_from[@]}" -o "$out/clip.avi" --seconds 1 --fps 10
edgetl run --model "$out/model.onnx" --source "$out/clip.avi" --headless --save "$out/clip-annotated.avi" \
  | .venv/bin/python -c "import sys, json, collections; c = collections.Counter(json.loads(l)['label'] for l in sys.stdin); print('frames by label:', dict(c))"

echo "== done in $(( $(date +%s) - started )) s: $out/model.onnx (see $out/MODEL_CARD.md)"
echo "live on a camera:  edgetl run --model $(printf '%q' "$root/$out/model.onnx") --camera 0"
if [ $# -eq 0 ]; then
  echo "your own photos:   bash scripts/demo.sh PATH/TO/PHOTOS   (one folder per class)"
fi
