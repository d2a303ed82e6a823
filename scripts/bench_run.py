"""Benchmark of `edgetl run --source VIDEO --headless` (issue: torch-free live runtime).

    python scripts/bench_run.py PHOTOS [--frames 300] [--rounds 3] [--device cpu|cuda]

Writes a 640x480 video from PHOTOS, trains nothing: it fuses the default backbone with a small
random head (speed does not depend on the weights). Prints, in one run:
 1. FPS of the run loop (headless, JSON to /dev/null) vs the bare fused-model session fed
    already-preprocessed frames at batch 1 (the ceiling), rounds interleaved, medians, ratio;
 2. import time and peak RSS of the runtime alone (a fresh interpreter that loads the model and
    classifies one frame), and whether torch was imported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2


def make_model(work: Path) -> Path:
    import onnx
    import torch

    from edgetl import backbones
    from edgetl import contract as C
    from edgetl.export import fuse
    from edgetl.export import torch_onnx as export
    from edgetl.export.graph import metadata

    export.export_backbone(backbones.get(), work / "backbone.onnx")
    b = onnx.load(str(work / "backbone.onnx"))
    meta = metadata(b)
    torch.manual_seed(0)
    h, _ = fuse.export_head(torch.nn.Sequential(torch.nn.Linear(1280, 3)), 1280, ["a", "b", "c"],
                            {C.KEY_FINGERPRINT: meta[C.KEY_FINGERPRINT], C.KEY_BACKBONE: meta[C.KEY_BACKBONE]})
    onnx.save(fuse.fuse(b, h), str(work / "model.onnx"))
    return work / "model.onnx"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("photos", type=Path)
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgetl-bench-"))
    model_path = make_model(work)
    files = sorted(a.photos.rglob("*.jpg"))
    video = work / "clip.avi"
    w = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 30, (640, 480))
    for i in range(a.frames):
        w.write(cv2.resize(cv2.imread(str(files[i % len(files)])), (640, 480)))
    w.release()

    import onnxruntime as ort

    from edgetl import contract as C
    from edgetl.data.preprocess import frame_to_input
    from edgetl.deploy import live, runtime

    model = runtime.load_model(model_path, a.device, spin=False)  # as `edgetl run` loads it
    provider = "CUDAExecutionProvider" if a.device == "cuda" else "CPUExecutionProvider"
    bare = ort.InferenceSession(str(model_path), providers=[provider])  # the ceiling: onnxruntime's defaults
    print(f"run loop on {model.provider}, bare session on {bare.get_providers()[0]}")
    cap = cv2.VideoCapture(str(video))
    inputs = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        inputs.append(frame_to_input(f, model.spec)[None])
    for x in inputs[:10]:
        model.session.run(None, {C.IMAGE: x})
        bare.run(None, {C.IMAGE: x})
    runs, ceils = [], []
    with open(os.devnull, "w") as null:
        for r in range(a.rounds):
            s = live.run(model, source=str(video), headless=True, out=null)
            runs.append(s.frames / s.seconds)
            t = time.perf_counter()
            for x in inputs:
                bare.run([C.PROBABILITIES], {C.IMAGE: x})
            ceils.append(len(inputs) / (time.perf_counter() - t))
            print(f"  round {r + 1}: run {runs[-1]:.1f} FPS (in-loop inference {s.stages_ms['inference']:.2f} ms), "
                  f"bare {ceils[-1]:.1f} FPS ({1000 / ceils[-1]:.2f} ms) ({s.frames} frames)")
    ratios = [x / c for x, c in zip(runs, ceils)]
    print(f"1. edgetl run --headless: {statistics.median(runs):.1f} FPS vs ceiling {statistics.median(ceils):.1f} FPS; "
          f"ratio {statistics.median(ratios):.2f} (per round {', '.join(f'{x:.2f}' for x in ratios)}; target >= 0.85)")

    probe = ("import time, sys, json; t = time.perf_counter(); import numpy, cv2, onnxruntime; "
             "t1 = time.perf_counter(); import edgetl.deploy.runtime as rt, edgetl.deploy.live; t2 = time.perf_counter(); "
             f"m = rt.load_model({str(model_path)!r}); m.predict_frame(numpy.zeros((480, 640, 3), numpy.uint8)); "
             "hwm = int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) / 1024; "
             "print(json.dumps({'deps_s': t1 - t, 'edgetl_s': t2 - t1, 'rss_mb': hwm, "
             "'torch': any(k.split('.')[0] == 'torch' for k in sys.modules)}))")
    res = [json.loads(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout)
           for _ in range(3)]
    print(f"2. runtime alone: import numpy+cv2+onnxruntime {statistics.median(r['deps_s'] for r in res):.2f} s, "
          f"edgetl.runtime+live {statistics.median(r['edgetl_s'] for r in res) * 1000:.0f} ms; peak RSS with "
          f"EfficientNet-Lite0 loaded {statistics.median(r['rss_mb'] for r in res):.0f} MB; torch imported: "
          f"{any(r['torch'] for r in res)}")


if __name__ == "__main__":
    main()
