#!/usr/bin/env bash
# Create .venv (if missing) and install edgetl into it. Idempotent: when nothing changed since the last
# run it only checks that everything imports (a few seconds).
#
#   bash scripts/setup.sh [demo]   what the main job needs: edgetl[train] (PyTorch, timm, onnx, onnxruntime, OpenCV)
#   bash scripts/setup.sh test     also the tests' and the optional engines' packages (pytest, moto, Ray, s3fs, ...)
#
#   EDGETL_TORCH=auto    (default) PyTorch's CPU-only wheels when this machine has no NVIDIA GPU (about
#                        0.7 GB instead of 5.5 GB), else the pinned build; when PyTorch's CPU index cannot
#                        be reached, one line says so and the pinned build is installed instead
#   EDGETL_TORCH=cpu     always the CPU-only wheels (same fallback)
#   EDGETL_TORCH=pinned  always TORCH_SPEC, default "torch==2.14.1 torchvision==0.29.1" (a CUDA build on
#                        Linux x86_64: about 5.5 GB with its NVIDIA libraries)
#   EDGETL_GPU=1         onnxruntime-gpu (CUDA provider) instead of onnxruntime
#
#   EDGETL_OPENCV=gui    the GUI build of OpenCV (opencv-python: needs the desktop's libGL and libxcb), for the
#                        overlay window of `edgetl run` (and its test); default: the headless build
#                        (opencv-python-headless). The two share one module folder: never both.
#
# A device that only runs models needs none of this: `pip install .` installs the runtime alone
# (onnxruntime, numpy, headless OpenCV; no torch), see the README.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-demo}
case "$mode" in
  demo) extras=train
        imports="edgetl, torch, torchvision, timm, onnx, onnxruntime, cv2" ;;
  test) extras=train,dev,lite,ray
        # >>> the optional features' extras, for their tests: append ",NAME" (e.g. ",serve,events,web")
        extras+=",serve,events,web"
        # <<<
        imports="edgetl, torch, torchvision, timm, onnx, onnxruntime, cv2, pytest, ray.data, s3fs, moto" ;;
  *) echo "setup: unknown mode '$mode' (demo or test)" >&2; exit 2 ;;
esac
py=${PYTHON:-python3}
torch_mode=${EDGETL_TORCH:-auto}
gpu=${EDGETL_GPU:-0}
opencv=${EDGETL_OPENCV:-headless}
spec=${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}
cpu_index=${EDGETL_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
[ -x .venv/bin/python ] || "$py" -m venv .venv
pip=(.venv/bin/python -m pip -q --disable-pip-version-check)
stamp=.venv/.edgetl-setup
base="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16) $torch_mode $gpu $opencv $spec"
have=$(cat "$stamp" 2>/dev/null || true)
# A test install is a demo install too.
if { [ "$have" = "$base $mode" ] || { [ "$mode" = demo ] && [ "$have" = "$base test" ]; }; } \
   && .venv/bin/python -c "import $imports" 2>/dev/null; then
  exit 0
fi

has_nvidia_gpu() {
  { command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; } || [ -e /proc/driver/nvidia ]
}
reachable() {  # an index answers within 10 s
  timeout 20 .venv/bin/python - "$1" <<'PY' >/dev/null 2>&1
import sys, urllib.request
urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=10).close()
PY
}
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  want_cpu=0
  case "$torch_mode" in
    cpu) want_cpu=1 ;;
    auto) has_nvidia_gpu || want_cpu=1 ;;
    pinned) ;;
    *) echo "setup: EDGETL_TORCH must be auto, cpu or pinned, not '$torch_mode'" >&2; exit 2 ;;
  esac
  if [ "$want_cpu" = 1 ] && ! reachable "$cpu_index"; then
    echo "setup: PyTorch's CPU index ($cpu_index) cannot be reached; installing the pinned build instead: $spec"
    want_cpu=0
  fi
  if [ "$want_cpu" = 1 ]; then
    "${pip[@]}" install torch torchvision --index-url "$cpu_index"
  else
    # shellcheck disable=SC2086
    "${pip[@]}" install $spec
  fi
fi
"${pip[@]}" install -e ".[$extras]"
# One OpenCV build only (they share the cv2 folder; some packages pull the GUI one in): remove both,
# then install the one wanted.
case "$opencv" in
  headless) want_cv=opencv-python-headless other_cv=opencv-python ;;
  gui) want_cv=opencv-python other_cv=opencv-python-headless ;;
  *) echo "setup: EDGETL_OPENCV must be headless or gui, not '$opencv'" >&2; exit 2 ;;
esac
if "${pip[@]}" show "$other_cv" >/dev/null 2>&1 || ! "${pip[@]}" show "$want_cv" >/dev/null 2>&1; then
  "${pip[@]}" uninstall -y opencv-python opencv-python-headless >/dev/null 2>&1 || true
  "${pip[@]}" install "$want_cv>=4.8"
fi
if [ "$gpu" = 1 ]; then  # the two onnxruntime packages share one folder: never keep both
  if "${pip[@]}" show onnxruntime >/dev/null 2>&1 || ! "${pip[@]}" show onnxruntime-gpu >/dev/null 2>&1; then
    "${pip[@]}" uninstall -y onnxruntime onnxruntime-gpu >/dev/null 2>&1 || true
    "${pip[@]}" install onnxruntime-gpu
  fi
fi
.venv/bin/python -c "import $imports"
if [ "$mode" = test ]; then  # the pinned onnxruntime-web files for export-web's tests (else fetched on first use)
  .venv/bin/python -c "from edgetl.deploy.web import fetch_runtime; fetch_runtime()" \
    || echo "setup: onnxruntime-web not fetched; edgetl export-web will fetch it on first use"
fi
echo "$base $mode" > "$stamp"
