"""The full fine-tuning recipe, one change at a time (`--unfreeze all --augment 1`, default options).

    python scripts/bench_finetune.py DATA [DATA ...] [--device cpu|cuda] [--only baseline,warmup,...]

Each variant adds one change to the baseline (AdamW, cosine per epoch, lr x0.1 for the pretrained
part, random resized crop + flip + light colour jitter): warm-up then cosine per step, TrivialAugment
(torchvision v2), mixup + cutmix, an EMA of the weights, layer-wise learning-rate decay; then all of
them. Prints validation accuracy and balanced accuracy of the fused model on each folder's val/ split
(or the recorded split), and the training time.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from edgetl import backbones
from edgetl.export import torch_onnx
from edgetl.train.finetune import Recipe
from edgetl.train.heads import HeadConfig
from edgetl.train.orchestrate import train_head
from edgetl.train.request import TrainRequest

VARIANTS = {
    "baseline": Recipe(),
    "warmup": Recipe(warmup=0.1),
    "trivialaugment": Recipe(trivial_augment=True),
    "mixup+cutmix": Recipe(mixup=0.2, cutmix=1.0),
    "ema": Recipe(ema=0.99),
    "llrd": Recipe(llrd=0.7),
    "all": Recipe(warmup=0.1, trivial_augment=True, mixup=0.2, cutmix=1.0, ema=0.99, llrd=0.7),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("data", nargs="+", type=Path)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--only", default=",".join(VARIANTS))
    ap.add_argument("--work", type=Path)
    a = ap.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="edgetl-ft-"))
    bb = work / "backbone.onnx"
    if not bb.exists():
        torch_onnx.export_backbone(backbones.get(), bb)
    print("| data | variant | val accuracy | balanced | epochs (kept) | train s |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for data in a.data:
        for name in a.only.split(","):
            t = time.perf_counter()
            s = train_head(TrainRequest(data, bb, work / "cache", work / f"{data.name}-{name}", HeadConfig(), device=a.device,
                           unfreeze="all", augment=1, recipe=VARIANTS[name])).summary
            m = s["metrics"]
            print(f"| {data.name} | {name} | {m['accuracy']:.4f} ({m['correct']}/{m['n']}) | {m['balanced_accuracy']:.4f} "
                  f"| {s['epochs_run']} ({s['best_epoch']}) | {time.perf_counter() - t:.0f} |", flush=True)


if __name__ == "__main__":
    main()
