"""Benchmark of `edgetl quantize`: float32 vs int8 (or fp16) accuracy and speed on real photo sets.

    python scripts/bench_quantize.py [DATA...] [--backbone exports/backbone.onnx] [--work DIR]
                                     [--precision int8|fp16] [--device cpu|cuda] [--threads 1] [--sweep]

For each DATA (default: the shared hymenoptera_data and oxford_pets37_sample under $EDGETL_DATASETS):
train-head (EfficientNet-Lite0, default options) → model.onnx, then `quantize_model` (the gate's own
figures: validation accuracy of both, top-1 agreement), then float32 and the converted model timed
side by side in this process, interleaved, `--threads` intra-op threads (default 1), medians:
batch 1 and batch 32. Goals on a 2-core AVX-512 VNNI machine: accuracy drop <= 1 point, speed-up
>= 1.5x at batch 1 and >= 1.8x at batch 32.

--sweep (int8) also compares reduce_range on/off, the calibration methods (minmax, percentile,
entropy) and which nodes stay in float (none; the default; the gate's fallback), on each DATA.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

from edgetl import contract as C
from edgetl.deploy.bench import time_interleaved
from edgetl.ort import session
from edgetl.export import calibrate
from edgetl.export import quantize as Q


def shared(name: str) -> Path:
    return Path(os.environ.get("EDGETL_DATASETS", "/work/shared/datasets")) / name


def edgetl(*args) -> None:
    r = subprocess.run([sys.executable, "-m", "edgetl.cli", *map(str, args)], capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"edgetl {' '.join(map(str, args))} failed:\n{r.stderr}")


def speed(float_bytes: bytes, q_bytes: bytes, device: str, threads: int, x1, x32) -> dict:
    """Batch-1 and batch-32 medians of float32 and the converted model, interleaved, and their ratios."""
    sf, sq = session(float_bytes, device, threads), session(q_bytes, device, threads)
    out = {}
    for b, x, rounds in ((1, x1, 60), (32, x32, 8)):
        st = time_interleaved({"f": lambda x=x: sf.run(None, {C.IMAGE: x}), "q": lambda x=x: sq.run(None, {C.IMAGE: x})},
                              rounds=rounds, warmup=2)
        out[b] = (st["f"]["p50_ms"], st["q"]["p50_ms"], st["f"]["p50_ms"] / st["q"]["p50_ms"])
    return out


def report(label: str, s: dict, sp: dict, precision: str) -> None:
    print(f"  {label}: val accuracy float32 {s['float32']['accuracy']:.4f}, {precision} {s[precision]['accuracy']:.4f} "
          f"(drop {100 * s['accuracy_drop']:+.1f} points), top-1 agreement {100 * s['agreement']:.1f} %; "
          f"batch 1 {sp[1][0]:.2f} → {sp[1][1]:.2f} ms ({sp[1][2]:.2f}x), "
          f"batch 32 {sp[32][0]:.0f} → {sp[32][1]:.0f} ms ({sp[32][2]:.2f}x)", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("data", nargs="*", type=Path)
    ap.add_argument("--backbone", type=Path, help="an exported backbone.onnx [default: export one to --work]")
    ap.add_argument("--work", type=Path, help="where models are trained [default: a temporary folder]")
    ap.add_argument("--precision", default="int8", choices=Q.PRECISIONS)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sweep", action="store_true", help="reduce_range, calibration methods, nodes kept in float")
    a = ap.parse_args()

    datasets = a.data or [shared("hymenoptera_data"), shared("oxford_pets37_sample")]
    work = a.work or Path(tempfile.mkdtemp(prefix="edgetl-bench-quant-"))
    backbone = a.backbone or work / "backbone.onnx"
    if not backbone.exists():
        edgetl("export-backbone", "-o", backbone)
    Q.GATE_BUDGET_S = 3.0  # the gate's own latency check; this script times more carefully below
    print(f"{Q.__name__}: {a.precision} vs float32, device {a.device}, {a.threads} thread(s), "
          f"reduce_range default {'on' if Q.default_reduce_range() else 'off'} (VNNI: {Q.cpu_has_vnni()})")
    for data in datasets:
        out = work / data.name
        if not (out / "model.onnx").exists():
            edgetl("train-head", data, "--backbone", backbone, "--cache", work / "cache", "-o", out)
        model = out / "model.onnx"
        float_bytes = model.read_bytes()
        rng = np.random.default_rng(0)
        x32 = rng.integers(0, 256, (32, 224, 224, 3), dtype=np.uint8)
        x1 = x32[:1]
        print(f"{data.name}:")
        r = Q.quantize_model(model, data, precision=a.precision, device=a.device, threads=a.threads, force=True)
        s = r.summary
        cal = s["calibration"]
        label = (f"default ({cal['method']}, {cal['images']} calibration photos, reduce_range "
                 f"{'on' if cal['reduce_range'] else 'off'}, kept in float: {cal['kept_float']['what']})"
                 if cal else "default")
        report(label, s, speed(float_bytes, r.data, a.device, a.threads, x1, x32), a.precision)
        if not a.sweep or a.precision != "int8":
            continue
        for calibration, rr in (("minmax", not cal["reduce_range"]), ("percentile", False), ("entropy", False)):
            r = Q.quantize_model(model, data, calibration=calibration, reduce_range=rr, threads=a.threads,
                                 max_drop=1.0, force=True)
            report(f"{calibration}, reduce_range {'on' if rr else 'off'}", r.summary,
                   speed(float_bytes, r.data, a.device, a.threads, x1, x32), "int8")
        # Every conv in int8, and the gate's fallback, forced: what keeping nodes in float costs and buys.
        prepared = Q.prepare(onnx.load(str(model)))
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            onnx.save(prepared, str(tmp / "p.onnx"))
            from edgetl.deploy.runtime import load_model, select_split

            fm = load_model(model, "cpu")
            cal_images, _ = Q.calibration_images(select_split(fm, data, "train").items, fm.spec, 200)
            val = calibrate.Images(select_split(fm, data, "val").items, fm.spec, fm.classes)
            f_pred, _, y = Q.predictions(session(float_bytes, "cpu"), val)
            always = calibrate.input_chain(prepared) + [n.name for n in prepared.graph.node if n.op_type == "Softmax"]
            for label, keep in [("nothing (every conv int8)", [])] + Q.float_plans(prepared)[1:]:
                q = calibrate.to_int8(tmp / "p.onnx", tmp / "q.onnx", cal_images, "minmax", cal["reduce_range"], always + keep,
                            tmp / "cal.json")
                qb = q.SerializeToString()
                q_pred, _, _ = Q.predictions(session(qb, "cpu"), val)
                sp = speed(float_bytes, qb, a.device, a.threads, x1, x32)
                print(f"  kept in float: {label}: val accuracy {np.mean(q_pred == y):.4f} (float32 {np.mean(f_pred == y):.4f}), "
                      f"agreement {100 * np.mean(q_pred == f_pred):.1f} %; batch 1 {sp[1][2]:.2f}x, batch 32 {sp[32][2]:.2f}x",
                      flush=True)


if __name__ == "__main__":
    main()
