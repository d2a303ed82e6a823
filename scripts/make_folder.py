"""Make an image folder of N distinct photos (class sub-folders kept) from a source folder.

Each copy is a re-encoded variant (flip, shift, JPEG quality), so every file has distinct bytes and
a content-addressed cache cannot reuse one for another.
    python scripts/make_folder.py SRC DST N
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np


def make(src: Path, dst: Path, n: int) -> Path:
    from concurrent.futures import ThreadPoolExecutor

    files = sorted(p for p in src.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))

    def one(i):
        f = files[i % len(files)]
        variant = i // len(files)
        out = dst / f.parent.name / f"{f.stem}_{variant:03d}.jpg"
        if out.exists():
            return
        out.parent.mkdir(parents=True, exist_ok=True)
        img = cv2.imread(str(f))
        if variant:
            img = np.roll(img[:, ::-1] if variant % 2 else img, variant, axis=1)
        cv2.imwrite(str(out), img, [cv2.IMWRITE_JPEG_QUALITY, 90 - variant % 10])

    with ThreadPoolExecutor() as pool:  # OpenCV releases the GIL: one file per core at a time
        list(pool.map(one, range(n)))
    return dst


if __name__ == "__main__":
    make(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
