"""Image folders: root/<class>/*, root/train|val/<class>/*, or a flat folder of unlabelled images."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from edgetl.data.preprocess import IMAGE_SUFFIXES
from edgetl.errors import DataError

SPLITS = ("train", "val", "test")
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*",
          b"\x00\x00\x00\x0cjP  ")


@dataclasses.dataclass(frozen=True)
class Item:
    path: Path
    label: str | None  # class name; None for unlabelled images
    split: str | None  # "train" | "val" | "test"; None when the folder has no split


@dataclasses.dataclass
class Dataset:
    root: Path
    items: list[Item]
    classes: list[str]  # sorted; empty for an unlabelled folder
    layout: str  # "split" | "classes" | "flat"

    def counts(self, split: str | None = None) -> dict[str, int]:
        out = {c: 0 for c in self.classes}
        for it in self.items:
            if it.label is not None and (split is None or it.split == split):
                out[it.label] += 1
        return out


def image_by_content(path: Path) -> bool:
    """Do the first bytes carry an image signature (JPEG, PNG, GIF, BMP, TIFF, WebP, JPEG 2000, PNM)?"""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return False
    return (head.startswith(_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")
            or (len(head) > 2 and head[0:1] == b"P" and head[1:2] in b"123456" and head[2:3].isspace()))


def looks_like_image(path: Path) -> bool:
    """By content first (any extension), then by extension (any case): a file named like an image is
    kept, to be reported as unreadable later."""
    return image_by_content(path) or path.suffix.lower() in IMAGE_SUFFIXES


def _visible(entries):
    return sorted((e for e in entries if not e.name.startswith(".") and e.name not in ("Thumbs.db", "__MACOSX")),
                  key=lambda e: e.name)


def _images_in(folder: Path, recursive: bool) -> list[Path]:
    out = []
    for e in _visible(folder.iterdir()):
        if e.is_dir():
            if recursive:
                out.extend(_images_in(e, True))
        elif e.is_file() and looks_like_image(e):
            out.append(e)
    return out


def scan(root: str | os.PathLike) -> Dataset:
    """Find the images under `root` and their labels/splits. DataError when there is nothing to use."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"not a folder: {root}")
    subdirs = [d for d in _visible(root.iterdir()) if d.is_dir()]
    splits = [d for d in subdirs if d.name.lower() in SPLITS]
    items: list[Item] = []
    if splits:
        layout = "split"
        for sd in splits:
            for cd in _visible(sd.iterdir()):
                if cd.is_dir():
                    items += [Item(p, cd.name, sd.name.lower()) for p in _images_in(cd, True)]
        classes = sorted({d.name for sd in splits for d in sd.iterdir() if d.is_dir() and not d.name.startswith(".")})
    elif subdirs:
        layout = "classes"
        for cd in subdirs:
            items += [Item(p, cd.name, None) for p in _images_in(cd, True)]
        classes = [d.name for d in subdirs]
    else:
        layout = "flat"
        items = [Item(p, None, None) for p in _images_in(root, False)]
        classes = []
    if not items:
        raise DataError(f"no images found in {root}")
    return Dataset(root, items, classes, layout)
