"""`edgetl run --collect DIR`: keep the frames the model is unsure about, to label and train on. Torch-free.

A frame is a candidate when its top probability is below `below`, when the top two are closer than
`margin`, or when the loop's decision is 'unknown' (under `run --threshold`). A candidate is saved
as `DIR/<predicted class>/<frame>-<time>.jpg` (the whole frame, as captured) with a JSON sidecar of
the same name (probabilities by class, reason, time, source, frame index and position, the model's
sha256), unless:

* the run already saved `max_frames` frames (the cap);
* less than `every` seconds of the source passed since the last frame saved (the rate limit; a
  folder of photos has no timeline, so there only the cap and the similarity check apply);
* it looks like a frame already saved (this run's, or a sidecar's already in DIR): a 256-bit
  difference hash of the frame (grey, 16x17 area average) within `min_distance` of a saved one's
  (fraction of bits that differ), so a still scene is saved once however long it stays.

DIR is meant to be sorted by hand: move each photo into its true class folder of the training data,
then `edgetl train-head DATA` embeds only the new photos (the cache is content-addressed). Keep DIR
outside DATA until then (DATA/<class>/ folders are read as classes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from pathlib import Path

import numpy as np

from edgetl.data.preprocess import opencv
from edgetl.deploy.video import UNKNOWN
from edgetl.errors import OutputError
from edgetl.files import writable_dir, write_bytes, write_text

HASH_SIZE = 16  # a HASH_SIZE x HASH_SIZE difference hash: 256 bits
SAME_SCENE = 0.1  # fraction of differing hash bits at or below which two frames are the same scene
JPEG_QUALITY = 95


def dhash(bgr: np.ndarray, size: int = HASH_SIZE) -> np.ndarray:
    """A difference hash: the frame in grey, area-averaged to size x (size+1), each pixel compared with
    its right neighbour → `size`² bits (packed uint8). Robust to noise, re-encoding and small brightness
    changes; a different scene flips about half of the bits."""
    cv2 = opencv()
    grey = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY) if bgr.ndim == 3 else bgr
    small = cv2.resize(grey, (size + 1, size), interpolation=cv2.INTER_AREA).astype(np.int16)
    return np.packbits(small[:, 1:] > small[:, :-1])


def hash_distance(a: np.ndarray, hashes: np.ndarray) -> np.ndarray:
    """Fraction of differing bits between hash `a` and each row of `hashes`."""
    return np.unpackbits(np.bitwise_xor(hashes, a), axis=-1).mean(axis=-1)


def folder_name(label: str) -> str:
    """A class name as one safe folder name (model metadata may hold anything)."""
    name = re.sub(r"[\x00-\x1f/\\]", "_", label).strip() or "_"
    name = "_" + name if name.startswith(".") else name
    if len(name.encode("utf-8", "surrogateescape")) > 100:  # a file system takes 255 bytes a name: cut, keep it unique
        tag = hashlib.sha256(label.encode("utf-8", "surrogateescape")).hexdigest()[:8]
        name = name.encode("utf-8", "surrogateescape")[:90].decode("utf-8", "ignore").rstrip() + "-" + tag
    return name


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclasses.dataclass
class Counts:
    candidates: int = 0  # frames the model was unsure about
    saved: int = 0
    similar: int = 0  # skipped: like a frame already saved
    rate: int = 0  # skipped: too soon after the last one saved
    cap: int = 0  # skipped: the cap was reached


class Collector:
    """Saves the frames a model is unsure about; `offer` is called by the live loop for every frame."""

    def __init__(self, folder, model, below: float | None = 0.6, margin: float | None = None,
                 threshold: float = 0.0, every: float = 1.0, max_frames: int | None = 500,
                 min_distance: float = SAME_SCENE, source: str = ""):
        self.classes = list(model.classes)
        photos = _photo_folder_around(Path(folder), self.classes)
        if photos is not None:  # the next train-head would train on the model's own guesses
            raise OutputError(f"--collect {folder} is inside the photo folder {photos} (it holds the model's class "
                              "folders): collect outside it, sort by hand, then move the photos in")
        self.folder = writable_dir(folder)  # an unwritable folder is an error before the first frame
        self.model_sha256 = file_sha256(model.path)
        self.model_path = str(model.path)
        self.below, self.margin, self.threshold = below, margin, threshold
        self.every, self.max_frames, self.min_distance = every, max_frames, min_distance
        self.source, self.timed = source, True
        self.counts = Counts()
        self.saved: list[Path] = []
        self._last_t: float | None = None
        self._hashes = self._known_hashes()

    def start(self, source: str, timed: bool) -> None:
        """Called by the loop once the source is open; `timed`: frames carry a position in time."""
        self.source, self.timed = source, timed

    def _known_hashes(self) -> np.ndarray:
        """Hashes of frames saved into the folder by earlier runs (from their sidecars)."""
        found = []
        for sidecar in sorted(self.folder.glob("*/*.json"))[:100_000]:
            try:
                h = json.loads(sidecar.read_text()).get("dhash")
                found.append(np.frombuffer(bytes.fromhex(h), np.uint8))
            except (OSError, ValueError, TypeError, AttributeError):
                continue
        found = [h for h in found if h.size == HASH_SIZE * HASH_SIZE // 8]
        return np.stack(found) if found else np.zeros((0, HASH_SIZE * HASH_SIZE // 8), np.uint8)

    def reason(self, probs: np.ndarray, decision: str) -> str | None:
        """Why this frame is worth keeping, or None when the model is sure enough."""
        order = np.argsort(-probs, kind="stable")
        top1 = float(probs[order[0]])
        top2 = float(probs[order[1]]) if len(order) > 1 else 0.0
        if decision == UNKNOWN:
            return f"unknown: top-1 {top1:.3f} below --threshold {self.threshold:g}"
        if self.below is not None and top1 < self.below:
            return f"low confidence: top-1 {top1:.3f} below {self.below:g}"
        if self.margin is not None and top1 - top2 < self.margin:
            return f"small margin: top-1 minus top-2 {top1 - top2:.3f} below {self.margin:g}"
        return None

    def offer(self, frame, probs: np.ndarray, decision: str) -> Path | None:
        """Look at one frame of the loop (a live.Frame, its probabilities, the loop's label); the saved
        JPEG's path, or None."""
        why = self.reason(probs, decision)
        if why is None:
            return None
        c = self.counts
        c.candidates += 1
        if self.max_frames is not None and c.saved >= self.max_frames:
            c.cap += 1
            return None
        if self.timed and self._last_t is not None and 0 <= frame.t - self._last_t < self.every:
            c.rate += 1
            return None
        h = dhash(frame.bgr)
        if len(self._hashes) and hash_distance(h, self._hashes).min() <= self.min_distance:
            c.similar += 1
            return None
        path = self._save(frame, probs, decision, why, h)
        self._hashes = np.concatenate([self._hashes, h[None]])
        self._last_t = frame.t
        c.saved += 1
        self.saved.append(path)
        return path

    def _save(self, frame, probs, decision, why, h) -> Path:
        predicted = self.classes[int(np.argmax(probs))]
        folder = self.folder / folder_name(predicted)
        now = time.time()
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f"{now % 1:.3f}"[1:] + "Z"
        stem = f"{frame.index:07d}-{stamp}"
        n = 1
        while (folder / f"{stem}.jpg").exists():  # two runs in the same millisecond
            n += 1
            stem = f"{frame.index:07d}-{stamp}-{n}"
        ok, data = opencv().imencode(".jpg", frame.bgr, [opencv().IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:
            raise OutputError(f"cannot encode frame {frame.index} as JPEG")
        sidecar = {
            "image": f"{stem}.jpg", "predicted": predicted, "decision": decision, "reason": why,
            "probabilities": {c: round(float(p), 6) for c, p in zip(self.classes, probs)},
            "frame": frame.index, "t": round(float(frame.t), 4), "source": self.source,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f"{now % 1:.3f}"[1:] + "Z",
            "model": self.model_path, "model_sha256": self.model_sha256, "dhash": h.tobytes().hex(),
        }
        write_bytes(folder / f"{stem}.jpg", data.tobytes())
        write_text(folder / f"{stem}.json", json.dumps(sidecar, indent=1, ensure_ascii=False, allow_nan=False) + "\n")
        return folder / f"{stem}.jpg"

    def line(self) -> str:
        """One line for the user: what was saved and what was skipped, and why."""
        c = self.counts
        skipped = [f"{n} {what}" for n, what in ((c.similar, "like a frame already saved"),
                                                 (c.rate, f"within {self.every:g} s of the last one saved "
                                                          "(--collect-every 0 keeps them, for a clip whose "
                                                          "scene changes faster)"),
                                                 (c.cap, f"over the cap of {self.max_frames}")) if n]
        return (f"collected {c.saved} of {c.candidates} unsure frames into {self.folder}"
                + (f" (skipped {', '.join(skipped)})" if skipped else ""))


def _photo_folder_around(folder: Path, classes: list[str]) -> Path | None:
    """The photo folder `folder` would be inside (an ancestor, up to three levels up, holding folders
    named like at least two of the model's classes, directly or under train/val/test), or None."""
    names = {folder_name(c) for c in classes}
    need = min(2, len(names))
    here = Path(os.path.abspath(folder))
    for anc in list(here.parents)[:3]:
        for base in (anc, anc / "train", anc / "val", anc / "test"):
            try:
                found = {e.name for e in os.scandir(base) if e.name in names and e.is_dir()}
            except OSError:
                continue
            if len(found) >= need and need:
                return anc
    return None


def sidecar_of(jpeg: str | os.PathLike) -> dict:
    """The sidecar of a collected JPEG."""
    return json.loads(Path(jpeg).with_suffix(".json").read_text())
