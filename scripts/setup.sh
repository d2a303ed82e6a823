#!/usr/bin/env bash
# Create .venv (if missing) and install edgetl for training, the Ray engine and tests into it. Idempotent: when
# nothing changed since the last run it only checks that everything imports (a few seconds).
#
#   EDGETL_TORCH=pinned  (default) TORCH_SPEC from PyPI, default "torch==2.14.1 torchvision==0.29.1"
#                        (a CUDA build on Linux x86_64: about 5.5 GB with its NVIDIA libraries)
#   EDGETL_TORCH=cpu     PyTorch's CPU-only wheels from https://download.pytorch.org/whl/cpu (under 1 GB)
#   EDGETL_GPU=1         onnxruntime-gpu (CUDA provider) instead of onnxruntime
#
# A device that only runs models needs none of this: `pip install .` installs the runtime alone
# (onnxruntime, numpy, OpenCV; no torch), see the README.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
torch_mode=${EDGETL_TORCH:-pinned}
gpu=${EDGETL_GPU:-0}
spec=${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}
[ -x .venv/bin/python ] || "$py" -m venv .venv
pip=(.venv/bin/python -m pip -q --disable-pip-version-check)
stamp=.venv/.edgetl-setup
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16) $torch_mode $gpu $spec"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
   && .venv/bin/python -c "import edgetl, torch, torchvision, timm, onnx, onnxruntime, cv2, pytest, ray.data, s3fs, moto" \
      2>/dev/null; then
  exit 0
fi
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  case "$torch_mode" in
    cpu) "${pip[@]}" install torch torchvision --index-url https://download.pytorch.org/whl/cpu ;;
    # shellcheck disable=SC2086
    *) "${pip[@]}" install $spec ;;
  esac
fi
"${pip[@]}" install -e ".[train,dev,lite,ray]"
if [ "$gpu" = 1 ]; then  # the two onnxruntime packages share one folder: never keep both
  if "${pip[@]}" show onnxruntime >/dev/null 2>&1 || ! "${pip[@]}" show onnxruntime-gpu >/dev/null 2>&1; then
    "${pip[@]}" uninstall -y onnxruntime onnxruntime-gpu >/dev/null 2>&1 || true
    "${pip[@]}" install onnxruntime-gpu
  fi
fi
echo "$want" > "$stamp"
