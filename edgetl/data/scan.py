"""Image folders: root/<class>/*, root/train|val/<class>/*, or a flat folder of unlabelled images.

Nothing found on disk is trusted: directory links are followed at most once per real directory,
a file reached twice (links, hard links) counts once, special files (FIFOs, sockets, devices) are
skipped, unreadable folders are skipped with a note, and folders that edgetl wrote itself (they
hold a marker file, see `files.mark_output`) are never read as photos.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path

from edgetl.data.reading import IMAGE_SUFFIXES
from edgetl.errors import DataError
from edgetl.files import MARKER

SPLITS = ("train", "val", "test")
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*",
          b"\x00\x00\x00\x0cjP  ")
IGNORED = ("Thumbs.db", "__MACOSX", "desktop.ini")


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
    notes: list[str] = dataclasses.field(default_factory=list)  # one line each: what was skipped and why
    # Where the bytes are: None for local files (Item.path a Path); a data.sources.S3Source for
    # s3:// data (root and Item.path are then "s3://bucket/key" strings).
    source: object = None

    def counts(self, split: str | None = None) -> dict[str, int]:
        out = {c: 0 for c in self.classes}
        for it in self.items:
            if it.label is not None and (split is None or it.split == split):
                out[it.label] += 1
        return out


def regular_file(path: str | os.PathLike) -> bool:
    """Is `path` (links followed) a regular file? FIFOs, sockets and devices are not (opening one can block)."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def image_by_content(path: Path) -> bool:
    """Do the first bytes carry an image signature (JPEG, PNG, GIF, BMP, TIFF, WebP, JPEG 2000, PNM)?
    Only regular files are opened."""
    if not regular_file(path):
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return False
    return image_signature(head)


def image_signature(head: bytes) -> bool:
    """Do these first (16) bytes of a file carry an image signature?"""
    return (head.startswith(_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")
            or (len(head) > 2 and head[0:1] == b"P" and head[1:2] in b"123456" and head[2:3].isspace()))


def looks_like_image(path: Path) -> bool:
    """By content first (any extension), then by extension (any case): a regular file named like an
    image is kept, to be reported as unreadable later."""
    return image_by_content(path) or (path.suffix.lower() in IMAGE_SUFFIXES and regular_file(path))


def is_edgetl_output(folder: Path) -> bool:
    try:
        return stat.S_ISREG(os.stat(Path(folder) / MARKER).st_mode)
    except (OSError, ValueError):  # not there, or a folder that cannot be read (its walk says so)
        return False


class _Walker:
    """One walk over a tree: each real directory and each real file at most once."""

    def __init__(self, exclude: set[tuple[int, int]]):
        self.dirs: set[tuple[int, int]] = set(exclude)
        self.files: set[tuple[int, int]] = set()
        self.notes: list[str] = []
        self.skipped_links = 0

    @staticmethod
    def ident(st) -> tuple[int, int]:
        return st.st_dev, st.st_ino

    def entries(self, folder: Path) -> list[os.DirEntry]:
        try:
            with os.scandir(folder) as it:
                return sorted((e for e in it if not e.name.startswith(".") and e.name not in IGNORED),
                              key=lambda e: e.name)
        except OSError as e:
            self.notes.append(f"skipped unreadable folder {folder}: {e.strerror}")
            return []

    def claim_dir(self, path: Path) -> bool:
        try:
            key = self.ident(os.stat(path))
        except OSError:
            return False
        if key in self.dirs:
            return False
        self.dirs.add(key)
        return True

    def images(self, folder: Path, recursive: bool, links: list) -> tuple[list[Path], bool]:
        """Image files below `folder` (real entries now; links appended to `links` for later), and
        whether an edgetl output folder was passed over."""
        out, passed_output = [], False
        for e in self.entries(folder):
            p = Path(e.path)
            try:
                if e.is_symlink():
                    links.append(p)
                    continue
                if e.is_dir(follow_symlinks=False):
                    if not recursive:
                        continue
                    if is_edgetl_output(p):
                        passed_output = True
                    elif self.claim_dir(p):
                        found, passed = self.images(p, True, links)
                        out += found
                        passed_output |= passed
                elif e.is_file(follow_symlinks=False) and self.claim_file(p) and looks_like_image(p):
                    out.append(p)
            except OSError:
                continue
        return out, passed_output

    def claim_file(self, path: Path) -> bool:
        try:
            st = os.stat(path)
        except OSError:
            return False
        if not stat.S_ISREG(st.st_mode) or self.ident(st) in self.files:
            return False
        self.files.add(self.ident(st))
        return True

    def follow(self, link: Path, recursive: bool) -> list[Path]:
        """A link met during the walk, followed once the real entries are all known."""
        if link.is_dir():
            if not recursive or is_edgetl_output(link) or not self.claim_dir(link):
                self.skipped_links += 1
                return []
            more: list = []
            found, _ = self.images(link, True, more)
            for m in more:
                found += self.follow(m, True)
            return found
        if self.claim_file(link) and looks_like_image(link):
            return [link]
        if link.exists():
            self.skipped_links += 1
        return []


def images_under(folder: str | os.PathLike) -> list[Path]:
    """Every image file below `folder` (links followed once, edgetl output skipped), sorted by path."""
    w = _Walker(set())
    w.claim_dir(Path(folder))
    links: list = []
    found, _ = w.images(Path(folder), True, links)
    for link in links:
        found += w.follow(link, True)
    return sorted(found)


def _ident_of(paths) -> set[tuple[int, int]]:
    out = set()
    for p in paths:
        try:
            out.add(_Walker.ident(os.stat(p)))
        except (OSError, TypeError, ValueError):
            pass
    return out


def split_folders(root, subdirs: list, name) -> list:
    """The train/ val/ test/ folders among DATA's subfolders (`name(d)`: a folder's name); DataError when
    they stand beside class folders (is "val" a class, or the split?). Local folders and s3:// alike."""
    splits = [d for d in subdirs if name(d).lower() in SPLITS]
    others = [name(d) for d in subdirs if name(d).lower() not in SPLITS]
    if splits and others:
        raise DataError(f"{root} has {'/, '.join(name(d) for d in splits)}/ beside class folders "
                        f"({', '.join(others[:3])}{', …' if len(others) > 3 else ''}): is "
                        f"{name(splits[0])!r} a class? Put the classes under train/ and val/, or rename that folder")
    return splits


def scan(root: str | os.PathLike, exclude=()) -> Dataset:
    """Find the images under `root` and their labels/splits. DataError when there is nothing to use.

    `exclude`: folders never to read (an output or cache folder that may sit inside `root`).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"not a folder: {root}")
    w = _Walker(_ident_of(exclude))
    w.claim_dir(root)
    top = w.entries(root)
    subdirs = []
    for e in top:
        p = Path(e.path)
        if p.is_dir() and not is_edgetl_output(p) and _ident_of([p]).isdisjoint(w.dirs):
            subdirs.append(p)
    splits = split_folders(root, subdirs, lambda d: d.name)
    items: list[Item] = []
    if splits:
        layout, classes = "split", set()
        for sd in splits:  # every split folder is known before any class folder (or a link to one) is read
            w.claim_dir(sd)
        for sd in splits:
            inside = [Path(e.path) for e in w.entries(sd)]
            class_dirs = [p for p in inside if p.is_dir()]
            loose = [p for p in inside if not p.is_dir() and looks_like_image(p)]
            if loose and not class_dirs:
                raise DataError(f"{sd} holds images directly: put them in {sd}/<class>/ (or, if "
                                f"{sd.name!r} is a class, rename it)")
            for label, found in _classes(w, class_dirs):
                classes.add(label)
                items += [Item(p, label, sd.name.lower()) for p in found]
        classes = sorted(classes)
    elif subdirs:
        layout = "classes"
        found_by_class = _classes(w, subdirs)
        classes = [label for label, _ in found_by_class]
        for label, found in found_by_class:
            items += [Item(p, label, None) for p in found]
        loose = [Path(e.path) for e in top if not Path(e.path).is_dir() and looks_like_image(Path(e.path))]
        if loose:
            w.notes.append(f"{len(loose)} images directly in {root} (not in a class folder) were ignored")
    else:
        layout, classes = "flat", []
        links: list = []
        found, _ = w.images(root, False, links)
        for link in links:
            found += w.follow(link, False)
        items = [Item(p, None, None) for p in found]
    if w.skipped_links:
        w.notes.append(f"{w.skipped_links} links to folders or files already scanned were not followed again")
    by_case: dict[str, list[str]] = {}
    for c in classes:
        by_case.setdefault(c.casefold(), []).append(c)
    for same in (v for v in by_case.values() if len(v) > 1):
        w.notes.append(f"class folders {', '.join(same)} differ only in case: they are {len(same)} classes "
                       "(merge them unless you mean it)")
    if not items:
        raise DataError(f"no images found in {root}")
    return Dataset(root, items, classes, layout, w.notes)


def _classes(w: _Walker, class_dirs: list[Path]) -> list[tuple[str, list[Path]]]:
    """(class name, images) per class folder: real entries of every class first, links after, so a
    link into another class's folder never files its photos under the wrong label. A folder that
    only holds edgetl's own output is not a class."""
    claimed = []
    for d in class_dirs:  # every class folder is known before any link is followed
        if w.claim_dir(d):
            claimed.append(d)
        else:  # a link to a folder already read (the root, a split folder, another class)
            w.skipped_links += 1
    class_dirs = claimed
    pending: dict[Path, list] = {}
    found: dict[Path, list[Path]] = {}
    passed: dict[Path, bool] = {}
    for d in class_dirs:
        pending[d] = []
        found[d], passed[d] = w.images(d, True, pending[d])
    for d in class_dirs:
        for link in pending[d]:
            found[d] += w.follow(link, True)
    out = []
    for d in class_dirs:
        if not found[d] and passed[d]:
            w.notes.append(f"{d} holds only edgetl output; not a class")
            continue
        out.append((d.name, found[d]))
    return out
