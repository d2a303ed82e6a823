#!/usr/bin/env bash
# The runtime-only install and `edgetl verify` in a minimal arm64 Debian under emulation (qemu-user), and the
# same photos' answers compared with this machine's (top-1 agreement, largest probability difference).
#
#   sudo bash scripts/verify_arm64.sh MODEL DATA [WORK]      (needs debootstrap, qemu-user-static, unshare)
#
# No binfmt_misc is needed: qemu-aarch64-static runs the guest's python directly, chrooted. The host's /sys is
# hidden behind an empty tmpfs: onnxruntime's CPU detection crashes (SIGSEGV) at import when it sees an x86
# /sys from an arm64 process. The guest gets the host venv's versions of numpy, OpenCV, onnxruntime and click
# (aarch64 wheels from PyPI, installed with the host's pip for the guest's platform) and edgetl's source.
# Emulation is not proof for a real board: say so wherever these figures are quoted.
set -euo pipefail
MODEL=$(realpath "$1"); DATA=$(realpath "$2"); WORK=${3:-/tmp/edgetl-arm64}
HERE=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$HERE/.venv/bin/python}
ROOT=$WORK/rootfs
mkdir -p "$WORK"
if [ ! -x "$ROOT/usr/bin/python3.11" ]; then
  debootstrap --foreign --arch=arm64 --variant=minbase --include=python3,libgomp1,libstdc++6 bookworm "$ROOT" \
    http://deb.debian.org/debian > "$WORK/debootstrap.log"
  for d in "$ROOT"/var/cache/apt/archives/*.deb; do dpkg-deb -x "$d" "$ROOT"; done  # no arm64 code runs to unpack
fi
cmp -s /usr/bin/qemu-aarch64-static "$ROOT/usr/bin/qemu-aarch64-static" || cp /usr/bin/qemu-aarch64-static "$ROOT/usr/bin/"
pins=$("$PY" - <<'EOF'
from importlib.metadata import version
print(" ".join(f"{p}=={version(p)}" for p in ("numpy", "opencv-python-headless", "onnxruntime", "click")))
EOF
)
"$PY" -m pip install -q --target "$ROOT/opt/site" --upgrade --only-binary=:all: --python-version 3.11 \
  --implementation cp --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 \
  --platform manylinux2014_aarch64 $pins
rm -rf "$ROOT/opt/src" && mkdir -p "$ROOT/opt/src" "$ROOT/mnt/model" "$ROOT/mnt/data" "$ROOT/mnt/out"
cp -a "$HERE/edgetl" "$ROOT/opt/src/"
cp "$MODEL" "$WORK/model.onnx"

guest() {  # guest PROGRAM ARGS...: run an arm64 program of the rootfs
  unshare -m --propagation private sh -c "mount -t proc proc $ROOT/proc && mount -t tmpfs none $ROOT/sys \
    && mount --bind $WORK $ROOT/mnt/model && mount --bind $DATA $ROOT/mnt/data \
    && exec env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin PYTHONPATH=/opt/src:/opt/site HOME=/root LANG=C.UTF-8 \
       chroot $ROOT /usr/bin/qemu-aarch64-static \"\$@\"" sh "$@"
}

echo "guest: $(guest /usr/bin/python3.11 -c 'import platform, numpy, cv2, onnxruntime; print(platform.machine(), "numpy", numpy.__version__, "OpenCV", cv2.__version__, "onnxruntime", onnxruntime.__version__)' 2>/dev/null)"
SUB=""; [ -d "$DATA/val" ] && SUB=val  # the photos compared: DATA's val/ folder when it has one
K=$("$PY" -c "import sys; from edgetl.deploy.runtime import load_model; print(len(load_model(sys.argv[1], 'cpu').classes))" "$MODEL")
start=$(date +%s)
guest /usr/bin/python3.11 -m edgetl.cli verify /mnt/model/model.onnx --data /mnt/data --targets cpu,opencv \
  2> "$WORK/verify.err" | tee "$WORK/verify.txt" || echo "verify in the guest failed: see $WORK/verify.err"
guest /usr/bin/python3.11 -m edgetl.cli predict /mnt/model/model.onnx "/mnt/data/$SUB" --top-k "$K" --format json \
  2> "$WORK/predict.err" > "$WORK/arm64.jsonl"
echo "guest time: $(( $(date +%s) - start )) s"
"$PY" -m edgetl.cli predict "$MODEL" "$DATA/$SUB" --top-k "$K" --format json > "$WORK/host.jsonl"
"$PY" - "$WORK/host.jsonl" "$WORK/arm64.jsonl" "$DATA" <<'EOF'
import json, sys
def read(path, prefix):
    out = {}
    for line in open(path):
        r = json.loads(line)
        if r.get("top"):
            out[r["path"][len(prefix):].lstrip("/")] = {t["class"]: t["prob"] for t in r["top"]}
    return out
host, arm = read(sys.argv[1], sys.argv[3]), read(sys.argv[2], "/mnt/data")
common = sorted(set(host) & set(arm))
same = sum(max(host[p], key=host[p].get) == max(arm[p], key=arm[p].get) for p in common)
diff = max(abs(host[p][c] - arm[p].get(c, 0.0)) for p in common for c in host[p])
print(f"arm64 (qemu) vs host: top-1 equal on {same} of {len(common)} photos; largest probability difference {diff:.2e}")
EOF
