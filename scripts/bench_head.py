"""Benchmarks of `edgetl train-head` (issue: new softmax on cached embeddings, fused model.onnx).

    python scripts/bench_head.py [--n 10000] [--dim 1280] [--classes 10]

1. Head training time on N × D generated embeddings (non-negative, clustered like pooled CNN
   features), default options, linear and mlp heads; target <= 10 s.
2. Batch-1 latency of the fused model vs the backbone alone (EfficientNet-Lite0, onnxruntime CPU),
   runs interleaved, medians; target <= 1.05x.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch  # imported before any timing: the import is not training time

from edgetl import backbones
from edgetl import contract as C
from edgetl.export.graph import metadata
from edgetl.ort import session
from edgetl.export import fuse
from edgetl.export import torch_onnx as export
from edgetl.train.heads import HeadConfig, train


def embeddings(n: int, dim: int, classes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.gamma(1.0, 0.5, (classes, dim))
    y = rng.integers(0, classes, n)
    x = np.clip(centers[y] + rng.normal(0, 3.0, (n, dim)), 0, 6).astype(np.float32)
    return x, y


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    a = ap.parse_args()

    x, y = embeddings(a.n, a.dim, a.classes)
    cut = int(0.8 * a.n)
    for kind in ("linear", "mlp"):
        t = time.perf_counter()
        r = train(x[:cut], y[:cut], x[cut:], y[cut:], a.classes, HeadConfig(kind=kind), device=a.device)
        sec = time.perf_counter() - t

        with torch.no_grad():
            acc = float((r.model(torch.from_numpy(x[cut:])).argmax(1).numpy() == y[cut:]).mean())
        print(f"1. {kind} head on {a.n} x {a.dim}: {sec:.2f} s ({r.epochs_run} epochs, best {r.best_epoch}, "
              f"val acc {acc:.3f}); target <= 10 s")

    work = Path(tempfile.mkdtemp(prefix="edgetl-bench-"))
    bb = backbones.get()
    export.export_backbone(bb, work / "backbone.onnx")
    r = train(x[:cut], y[:cut], x[cut:], y[cut:], a.classes, HeadConfig(max_epochs=5), device=a.device)
    import onnx

    b = onnx.load(str(work / "backbone.onnx"))
    meta = metadata(b)
    h, _ = fuse.export_head(r.model, a.dim, [str(i) for i in range(a.classes)],
                            {C.KEY_FINGERPRINT: meta[C.KEY_FINGERPRINT], C.KEY_BACKBONE: meta[C.KEY_BACKBONE]})
    fused = fuse.fuse(b, h)
    sb, sf = session(b.SerializeToString(), "cpu"), session(fused.SerializeToString(), "cpu")
    img = np.random.default_rng(1).integers(0, 256, (1, 224, 224, 3), dtype=np.uint8)
    for s in (sb, sf):
        for _ in range(20):
            s.run(None, {C.IMAGE: img})
    tb, tf = [], []
    for _ in range(a.runs):
        for s, acc in ((sb, tb), (sf, tf)):
            t = time.perf_counter()
            s.run(None, {C.IMAGE: img})
            acc.append(time.perf_counter() - t)
    mb, mf = statistics.median(tb) * 1e3, statistics.median(tf) * 1e3
    print(f"2. batch-1 latency (median of {a.runs}, interleaved): backbone {mb:.2f} ms, fused {mf:.2f} ms, "
          f"ratio {mf / mb:.3f}; target <= 1.05")


if __name__ == "__main__":
    main()
