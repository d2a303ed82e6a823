"""Heads on features from several depths (`train-head --features multi`) against the other regimes, and
what they cost, on the validation photos only (every regime sees the same split).

    python scripts/bench_depths.py [--hymenoptera DIR] [--pets DIR] [--far digits,faces] [--unfreeze 1,2]
                                   [--full] [--work DIR]

Datasets: the shared hymenoptera and Oxford pets sample (when given), the imbalanced layout of
scripts/bench_imbalance.py made from the pets sample (10 Tigger / 10 Misty / 350 neither), and sets far
from ImageNet made from images that PyPI packages ship (`pip install scikit-learn scikit-image`):
"digits" (scikit-learn's 8x8 handwritten digits, 40 per class, upscaled by the preprocessing) and "faces"
(scikit-image's LFW subset: 100 faces and 100 non-faces of 25x25 pixels). Regimes: the linear head and the
mlp head on the last layer, `--unfreeze N` for each N given, `--features multi`, and with --full the whole
network fine-tuned (on the far sets only: slow on a CPU). Also: the multi-depth backbone's embedding time
against the plain backbone's (fresh caches, interleaved rounds) and the fused models' batch-1 latency.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from edgetl import backbones
from edgetl.data.embed import embed_folder
from edgetl.deploy.bench import time_interleaved
from edgetl.export.torch_onnx import export_backbone
from edgetl.ort import session
from edgetl.train.heads import HeadConfig
from edgetl.train.orchestrate import train_head
from edgetl.train.request import TrainRequest


def write_png(path: Path, gray: np.ndarray) -> None:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), gray)


def digits(root: Path, per_class: int = 40, seed: int = 0) -> Path:
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = random.Random(seed)
    for c in range(10):
        idx = [i for i in range(len(d.target)) if d.target[i] == c]
        for i in rng.sample(idx, per_class):
            write_png(root / f"digit{c}" / f"{i:04d}.png", (d.images[i] * (255 / 16)).round().astype(np.uint8))
    return root


def faces(root: Path) -> Path:
    from skimage.data import lfw_subset

    x = lfw_subset()  # 100 faces, then 100 non-faces, float in [0, 1]
    for i, img in enumerate(x):
        write_png(root / ("face" if i < 100 else "not-face") / f"{i:03d}.png", (img * 255).round().astype(np.uint8))
    return root


def imbalanced(pets: Path, root: Path, seed: int = 0) -> Path:
    photos: dict[str, list[Path]] = {}
    for p in sorted(pets.glob("*/*/*.jpg")):
        photos.setdefault(p.parent.name, []).append(p)
    tigger, misty = "Bombay", "Siamese"
    others = sorted(p for b, ps in photos.items() if b not in (tigger, misty) for p in ps)
    chosen = {"Tigger": photos[tigger][:10], "Misty": photos[misty][:10],
              "neither": random.Random(seed).sample(others, min(350, len(others)))}
    for cls, ps in chosen.items():
        (root / cls).mkdir(parents=True)
        for p in ps:
            (root / cls / p.name).symlink_to(p.resolve())
    return root


def regime(data: Path, bb: Path, work: Path, name: str, **kw) -> dict:
    t = time.perf_counter()
    head = HeadConfig(kind=kw.pop("kind", "linear"))
    r = train_head(TrainRequest(data, bb, work / "cache", work / "out" / f"{data.name}-{name}", head, **kw))
    m = r.metrics
    f = r.summary.get("features") or {}
    return {"dataset": data.name, "regime": name, "accuracy": m["accuracy"], "balanced": m["balanced_accuracy"],
            "correct": m["correct"], "n": m["n"], "seconds": time.perf_counter() - t,
            "depths": "+".join(f.get("depths", [])) or "last", "model": r.out / "model.onnx"}


def embed_cost(data: Path, plain: Path, multi: Path, work: Path, rounds: int) -> tuple[float, list[float]]:
    """Median ratio multi/plain of a fresh `embed` of `data`, rounds interleaved."""
    ratios = []
    for k in range(rounds):
        times = {}
        for name, bb in (("plain", plain), ("multi", multi)) if k % 2 == 0 else (("multi", multi), ("plain", plain)):
            cache = work / f"embed-{name}-{k}"
            t = time.perf_counter()
            embed_folder(data, bb, cache, progress=None)
            times[name] = time.perf_counter() - t
            shutil.rmtree(cache, ignore_errors=True)
        ratios.append(times["multi"] / times["plain"])
    return statistics.median(ratios), ratios


def latency(plain_model: Path, multi_model: Path) -> dict:
    """Batch-1 latency of the two fused models, one thread each, interleaved (median ms)."""
    sessions = {n: session(p, "cpu", threads=1) for n, p in (("plain", plain_model), ("multi", multi_model))}
    h, w = sessions["plain"].get_inputs()[0].shape[1:3]
    x = np.random.default_rng(0).integers(0, 255, (1, h, w, 3), dtype=np.uint8)
    stats = time_interleaved({n: (lambda s=s: s.run(None, {"image": x})) for n, s in sessions.items()}, rounds=200,
                             budget_s=40)
    return {n: s["p50_ms"] for n, s in stats.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hymenoptera", type=Path)
    ap.add_argument("--pets", type=Path)
    ap.add_argument("--far", default="digits,faces")
    ap.add_argument("--unfreeze", default="1,2", help="--unfreeze N regimes to run (comma list; empty: none)")
    ap.add_argument("--full", action="store_true", help="also fine-tune the whole network on the far sets")
    ap.add_argument("--embed-rounds", type=int, default=3)
    ap.add_argument("--work", type=Path)
    a = ap.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="edgetl-bench-depths-"))
    bb = work / "backbone.onnx"
    if not bb.exists():
        export_backbone(backbones.get("efficientnet_lite0"), bb)
    sets: list[tuple[Path, bool]] = []  # (folder, far from ImageNet)
    if a.hymenoptera:
        sets.append((a.hymenoptera, False))
    if a.pets:
        sets.append((a.pets, False))
        sets.append((imbalanced(a.pets, work / "data" / "pets-imbalanced"), False))
    makers = {"digits": digits, "faces": faces}
    for name in [n for n in a.far.split(",") if n]:
        sets.append((makers[name](work / "data" / name), True))
    rows = []
    for data, far in sets:
        runs = [("linear", {}), ("mlp", {"kind": "mlp"}), ("multi", {"features": "multi"})]
        runs += [(f"unfreeze {n}", {"unfreeze": n}) for n in a.unfreeze.split(",") if n]
        if far and a.full:
            runs.append(("whole network", {"unfreeze": "all", "augment": 1}))
        for name, kw in runs:
            row = regime(data, bb, work, name, **kw)
            rows.append(row)
            print(f"| {row['dataset']} | {name} | {row['accuracy']:.4f} ({row['correct']}/{row['n']}) | "
                  f"{row['balanced']:.4f} | {row['depths']} | {row['seconds']:.0f} |", flush=True)
    print("\n| dataset | regime | accuracy | balanced | depths | seconds |\n| --- | --- | ---: | ---: | --- | ---: |")
    for row in rows:
        print(f"| {row['dataset']} | {row['regime']} | {row['accuracy']:.4f} ({row['correct']}/{row['n']}) | "
              f"{row['balanced']:.4f} | {row['depths']} | {row['seconds']:.0f} |")
    first = sets[0][0]
    multi_bb = next((work / "cache" / "depths").glob("*.onnx"))
    ratio, ratios = embed_cost(first, bb, multi_bb, work, a.embed_rounds)
    print(f"\nembed {first.name}, fresh cache: multi-depth / plain backbone = {ratio:.2f} "
          f"(rounds {', '.join(f'{r:.2f}' for r in ratios)})")
    # Whatever depths a head reads, the fused graph runs the multi-depth backbone whole: any multi model will do.
    plain = next(r["model"] for r in rows if r["regime"] == "linear" and r["dataset"] == first.name)
    multi = next(r["model"] for r in rows if r["regime"] == "multi" and r["dataset"] == first.name)
    lat = latency(plain, multi)
    print(f"fused model, batch 1, 1 thread: plain {lat['plain']:.2f} ms, multi-depth {lat['multi']:.2f} ms, "
          f"ratio {lat['multi'] / lat['plain']:.3f}")


if __name__ == "__main__":
    main()
