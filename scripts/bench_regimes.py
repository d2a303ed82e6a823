"""Validation accuracy of every training regime on photo folders (issue: fewer frozen layers).

    python scripts/bench_regimes.py DATA [DATA ...] [--augment 4] [--only linear,mlp,1,2,all,auto]

For each folder: linear head, mlp head, --unfreeze 1, --unfreeze 2, --unfreeze all, each without
and with --augment K, then --unfreeze auto; default options otherwise, EfficientNet-Lite0.
Prints a markdown table (accuracy on the folder's val/ split, measured on the fused model).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from edgetl import backbones
from edgetl.export import torch_onnx as export
from edgetl.train.heads import HeadConfig
from edgetl.train.orchestrate import train_head
from edgetl.train.request import TrainRequest


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("data", nargs="+", type=Path)
    ap.add_argument("--augment", type=int, default=4)
    ap.add_argument("--only", default="linear,mlp,1,2,all,auto")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    a = ap.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="edgetl-regimes-"))
    bb = work / "backbone.onnx"
    if not bb.exists():
        export.export_backbone(backbones.get(), bb)
    rows = []
    wanted = a.only.split(",")
    for data in a.data:
        for name in wanted:
            for aug in ((0,) if name == "auto" else (0, a.augment)):
                kind = "mlp" if name == "mlp" else "linear"
                unfreeze = {"linear": "0", "mlp": "0"}.get(name, name)
                t = time.perf_counter()
                s = train_head(TrainRequest(data, bb, work / "cache", work / f"{data.name}-{name}-{aug}", HeadConfig(kind=kind),
                               unfreeze=unfreeze, augment=aug, device=a.device)).summary
                sec = time.perf_counter() - t
                m = s["metrics"]
                rows.append((data.name, name, aug, m["accuracy"], m["correct"], m["n"], sec, s["regime"]))
                picked = f" (auto picked: {s['search']['chosen']})" if s.get("search") else ""
                print(f"| {data.name} | {name} | {aug} | {m['accuracy']:.4f} ({m['correct']}/{m['n']}) | {sec:.0f} s | "
                      f"{s['regime']}{picked} |", flush=True)
                if s.get("search") and s["search"]["rows"]:
                    from edgetl.train.search import Row, table

                    print(f"    {s['auto_reason']}\n    " + "\n    ".join(table([Row(**x) for x in s["search"]["rows"]])),
                          flush=True)


if __name__ == "__main__":
    main()
