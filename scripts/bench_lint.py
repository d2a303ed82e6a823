"""Measure `edgetl lint` on planted errors: copies of a train/val photo folder with 5 % of the training
labels flipped at random and photos of val/ copied into train/ (3 byte-identical, 3 near copies:
resized to 90 % and re-encoded at JPEG quality 85).

    python scripts/bench_lint.py HYMENOPTERA --backbone exports/backbones/efficientnet_lite0.onnx \\
        [--seeds 5] [--cache /tmp/lint-cache] [--work /tmp/lint-bench]

Prints, per seed and over all seeds, label-error recall and precision (against the flips), how many
planted copies were reported as leakage, and the time of the lint call.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

import cv2
import numpy as np


def plant(src: Path, dst: Path, seed: int, flip_share: float = 0.05):
    """Copy `src` to `dst` and plant errors; returns (flipped relative paths, [pairs of planted copies])."""
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    rng = np.random.default_rng(seed)
    train = sorted(p for p in (dst / "train").glob("*/*") if p.is_file())
    classes = sorted(d.name for d in (dst / "train").iterdir() if d.is_dir())
    flipped = set()
    for i in rng.choice(len(train), round(flip_share * len(train)), replace=False):
        p = train[i]
        other = rng.choice([c for c in classes if c != p.parent.name])
        shutil.move(p, dst / "train" / other / p.name)
        flipped.add(f"train/{other}/{p.name}")
    val = sorted(p for p in (dst / "val").glob("*/*") if p.is_file())
    copies = []
    for n, i in enumerate(rng.choice(len(val), 6, replace=False)):
        p = val[i]
        q = dst / "train" / p.parent.name / f"copy_{p.stem}.jpg"
        if n < 3:
            shutil.copy(p, q)
        else:
            img = cv2.imread(str(p))
            cv2.imwrite(str(q), cv2.resize(img, None, fx=0.9, fy=0.9, interpolation=cv2.INTER_AREA),
                        [cv2.IMWRITE_JPEG_QUALITY, 85])
        copies.append({f"val/{p.parent.name}/{p.name}", f"train/{p.parent.name}/{q.name}"})
    return flipped, copies


def main():
    from edgetl.train.lint import lint

    ap = argparse.ArgumentParser()
    ap.add_argument("data", type=Path, help="a folder with train/ and val/ class folders (hymenoptera)")
    ap.add_argument("--backbone", required=True)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/lint-bench-cache"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/lint-bench"))
    a = ap.parse_args()
    rec, prec, secs = [], [], []
    for seed in range(a.seeds):
        flipped, copies = plant(a.data, a.work / f"seed{seed}", seed)
        t = time.perf_counter()
        r = lint(a.work / f"seed{seed}", a.backbone, a.cache)
        secs.append(time.perf_counter() - t)
        flagged = {e["path"] for e in r["label_errors"]}
        tp = len(flagged & flipped)
        rec.append(tp / len(flipped))
        prec.append(tp / max(len(flagged), 1))
        leaks = [{it["path"] for it in g["items"]} for g in r["duplicates"] if g["leakage"]]
        found = sum(any(c <= g for g in leaks) for c in copies)
        print(f"seed {seed}: {len(flipped)} flipped, {len(flagged)} flagged, recall {rec[-1]:.2f}, precision "
              f"{prec[-1]:.2f}; planted copies reported as leakage {found}/{len(copies)}; near-duplicate threshold "
              f"{r['settings']['near_duplicate_cosine']:.3f}; {secs[-1]:.1f} s", flush=True)
        shutil.rmtree(a.work / f"seed{seed}", ignore_errors=True)
    print(f"recall mean {statistics.mean(rec):.2f} (min {min(rec):.2f}), precision mean {statistics.mean(prec):.2f} "
          f"(min {min(prec):.2f}), lint {statistics.median(secs):.1f} s (median)")


if __name__ == "__main__":
    main()
