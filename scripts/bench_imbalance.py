"""Accuracy and balanced accuracy of default `train-head` on imbalanced folders, before and after.

    python scripts/bench_imbalance.py PETS [HYMENOPTERA] [--pairs 6] [--work DIR]

PETS is the Oxford pets sample (breed folders): the seed's story is built from it, 10 photos of each
of two cat breeds ("Tigger", "Misty") and N of "neither" (other breeds, cats and dogs) for N = 10,
40, 160, 350 (1:1, 4:1, 16:1, 35:1), averaged over seeded random pairs of cat breeds. HYMENOPTERA
(train/ and val/ folders): the training bees are cut to 1/4 and 1/16 of the ants. "before" is the
old loss (PyTorch's cross_entropy with class weights and label smoothing, early stopping on the
weighted validation loss); "after" is the default. Scores are on validation photos only.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import tempfile
from pathlib import Path

from edgetl import backbones
from edgetl.export import torch_onnx
from edgetl.train.heads import HeadConfig
from edgetl.train.orchestrate import train_head
from edgetl.train.request import TrainRequest


def pets_layout(pets: Path, root: Path, tigger: str, misty: str, n_neither: int, seed: int) -> Path:
    photos: dict[str, list[Path]] = {}
    for p in sorted(pets.glob("*/*/*.jpg")):
        photos.setdefault(p.parent.name, []).append(p)
    others = sorted(p for b, ps in photos.items() if b not in (tigger, misty) for p in ps)
    chosen = {"Tigger": photos[tigger], "Misty": photos[misty], "neither": random.Random(seed).sample(others, n_neither)}
    for cls, ps in chosen.items():
        (root / cls).mkdir(parents=True)
        for p in ps:
            (root / cls / p.name).symlink_to(p.resolve())
    return root


def hym_layout(hym: Path, root: Path, bees_fraction: float, seed: int) -> Path:
    for split in ("train", "val"):
        for cls in ("ants", "bees"):
            src = sorted((hym / split / cls).iterdir())
            if split == "train" and cls == "bees":
                src = random.Random(seed).sample(src, max(2, round(len(src) * bees_fraction)))
            (root / split / cls).mkdir(parents=True)
            for p in src:
                (root / split / cls / p.name).symlink_to(p.resolve())
    return root


def run(data, bb, cache, out, balance):
    s = train_head(TrainRequest(data, bb, cache, out, HeadConfig(balance=balance))).summary
    m = s["metrics"]
    return m["accuracy"], m["balanced_accuracy"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("pets", type=Path)
    ap.add_argument("hymenoptera", type=Path, nargs="?")
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--work", type=Path)
    a = ap.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="edgetl-imbalance-"))
    bb = work / "backbone.onnx"
    if not bb.exists():
        torch_onnx.export_backbone(backbones.get(), bb)
    cache = work / "cache"
    cats = sorted({p.name for p in a.pets.glob("*/*") if p.is_dir() and p.name[0].isupper()})
    pairs = random.Random(0).sample([(x, y) for x in cats for y in cats if x < y], a.pairs)
    print(f"pets: 10 Tigger / 10 Misty / N neither, {a.pairs} random pairs of cat breeds; mean (min) over pairs")
    print("| imbalance | before: accuracy | before: balanced | after: accuracy | after: balanced |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for n in (10, 40, 160, 350):
        res = {"legacy": [], "weighted": []}
        for k, (x, y) in enumerate(pairs):
            root = work / f"pets-{n}-{k}"
            shutil.rmtree(root, ignore_errors=True)
            data = pets_layout(a.pets, root / "photos", x, y, n, k)
            for balance in res:
                res[balance].append(run(data, bb, cache, root / balance, balance))
        cells = []
        for balance in res:
            for j in (0, 1):
                vals = [r[j] for r in res[balance]]
                cells.append(f"{statistics.mean(vals):.3f} ({min(vals):.3f})")
        print(f"| {n // 10}:1 (10/10/{n}) | " + " | ".join(cells) + " |", flush=True)
    if a.hymenoptera:
        print("\nhymenoptera: training bees cut to a fraction of the ants; the val/ folder as it is; 3 seeds")
        print("| ants:bees (train) | before: accuracy | before: balanced | after: accuracy | after: balanced |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for frac in (1.0, 0.25, 1 / 16):
            res = {"legacy": [], "weighted": []}
            for seed in range(3):
                root = work / f"hym-{frac:.3f}-{seed}"
                shutil.rmtree(root, ignore_errors=True)
                data = hym_layout(a.hymenoptera, root / "photos", frac, seed)
                for balance in res:
                    res[balance].append(run(data, bb, cache, root / balance, balance))
            cells = [f"{statistics.mean(r[j] for r in res[b]):.3f}" for b in res for j in (0, 1)]
            print(f"| {round(1 / frac)}:1 | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
