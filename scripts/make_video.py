"""Make a short test video from photos: each photo fills a 640x480 frame (letterboxed) for a while.

    python scripts/make_video.py PHOTO|FOLDER... -o clip.avi [--seconds 1.5] [--fps 10]

Folders contribute every image below them, sorted. Written with OpenCV (MJPG in .avi plays everywhere
OpenCV runs); edgetl run --source clip.avi then classifies it frame by frame.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from edgetl.data.scan import images_under


def letterbox(img: np.ndarray, w: int = 640, h: int = 480) -> np.ndarray:
    s = min(w / img.shape[1], h / img.shape[0])
    small = cv2.resize(img, (round(img.shape[1] * s), round(img.shape[0] * s)), interpolation=cv2.INTER_AREA)
    frame = np.zeros((h, w, 3), np.uint8)
    y, x = (h - small.shape[0]) // 2, (w - small.shape[1]) // 2
    frame[y:y + small.shape[0], x:x + small.shape[1]] = small
    return frame


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("photos", nargs="+", type=Path)
    ap.add_argument("-o", "--output", type=Path, required=True)
    ap.add_argument("--seconds", type=float, default=1.5)
    ap.add_argument("--fps", type=float, default=10)
    a = ap.parse_args()
    files = [f for p in a.photos for f in (images_under(p) if p.is_dir() else [p])]
    if not files:
        raise SystemExit("make_video: no photos given")
    video = cv2.VideoWriter(str(a.output), cv2.VideoWriter_fourcc(*"MJPG"), a.fps, (640, 480))
    per = max(1, round(a.seconds * a.fps))
    for f in files:
        frame = letterbox(cv2.imread(str(f), cv2.IMREAD_COLOR))
        for _ in range(per):
            video.write(frame)
    video.release()
    print(f"wrote {a.output}: {len(files)} photos, {len(files) * per} frames at {a.fps:g} fps")


if __name__ == "__main__":
    main()
