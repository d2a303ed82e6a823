"""Build the bundled sample photo set (samples/) from a copy of the Oxford-IIIT Pet sample.

    python scripts/make_sample.py PETS_SAMPLE [--out samples]

PETS_SAMPLE holds <split>/<Breed>/<Breed>_<n>.jpg (10 photos per breed). The seed's story: two cats,
"Tigger" (a Bombay) and "Misty" (a Siamese), and "neither" (two photos of every other breed, cats and
dogs). Two photos of each cat and four others are held back (samples/pets-held-back/) for the demo's
video. Photos are downscaled to 256 px on the shorter side (what the default backbone uses) and saved
as JPEG quality 90. Deterministic: the same input gives the same files.
"""

from __future__ import annotations

import argparse
import random
import shutil
from pathlib import Path

import cv2

TIGGER, MISTY = "Bombay", "Siamese"


def save_small(src: Path, dst: Path, short: int = 256) -> None:
    img = cv2.imread(str(src), cv2.IMREAD_COLOR)
    h, w = img.shape[:2]
    s = short / min(h, w)
    if s < 1:
        img = cv2.resize(img, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA)
    dst.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(dst), img, [cv2.IMWRITE_JPEG_QUALITY, 90])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("pets", type=Path)
    ap.add_argument("--out", type=Path, default=Path("samples"))
    a = ap.parse_args()
    by_breed: dict[str, list[Path]] = {}
    for p in sorted(a.pets.glob("*/*/*.jpg")):
        by_breed.setdefault(p.parent.name, []).append(p)
    rng = random.Random(0)
    train, held = a.out / "pets", a.out / "pets-held-back"
    for d in (train, held):
        shutil.rmtree(d, ignore_errors=True)
    others = sorted(b for b in by_breed if b not in (TIGGER, MISTY))
    held_others = set(rng.sample(others, 4))
    for name, breed in (("Tigger", TIGGER), ("Misty", MISTY)):
        photos = sorted(by_breed[breed])
        rng.shuffle(photos)
        for p in photos[:8]:
            save_small(p, train / name / p.name)
        for p in photos[8:10]:
            save_small(p, held / name / p.name)
    for breed in others:
        photos = sorted(by_breed[breed])
        rng.shuffle(photos)
        for p in photos[:2]:
            save_small(p, train / "neither" / p.name)
        if breed in held_others:
            save_small(photos[2], held / "neither" / photos[2].name)
    n = sum(1 for _ in train.rglob("*.jpg")), sum(1 for _ in held.rglob("*.jpg"))
    size = sum(p.stat().st_size for p in a.out.rglob("*.jpg"))
    print(f"wrote {n[0]} photos to {train} and {n[1]} to {held} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
