"""Torch-free inference: an edgetl model.onnx loaded and checked, prediction, evaluation on a split.

Needs only onnxruntime, numpy and OpenCV, so it is what ships to a device.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgetl import contract as C
from edgetl.data.pipeline import image_batches, prefetch_map
from edgetl.data.preprocess import frame_to_input, load_image
from edgetl.data.scan import images_under, scan
from edgetl.data.split import decode_keys, short
from edgetl.errors import DataError, ModelError
from edgetl.ort import check_io, read_metadata, session, static_dim
from edgetl.quality.metrics import imbalance_warnings, metrics
from edgetl.spec import Spec


@dataclasses.dataclass
class Model:
    """A loaded edgetl model.onnx: uint8 images in, class probabilities out."""

    path: str
    session: object
    classes: list[str]
    spec: Spec
    metadata: dict[str, str]

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """uint8 [N,H,W,3] RGB (already preprocessed) → float32 [N,C]."""
        return self.session.run([C.PROBABILITIES], {C.IMAGE: batch})[0]

    def predict_files(self, paths) -> np.ndarray:
        return self.probabilities(np.stack([load_image(p, self.spec) for p in paths]))

    def predict_frame(self, bgr: np.ndarray) -> np.ndarray:
        return self.probabilities(frame_to_input(bgr, self.spec)[None])[0]

    def frame_runner(self):
        """A function uint8 [H,W,3] (preprocessed) → probabilities [C], for loops over single frames:
        input and output stay bound to buffers allocated once (on the GPU when the model runs there),
        so a frame costs one copy in and one out, and no allocation."""
        h, w = self.spec.input_size
        dev = "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"
        try:
            x = ort.OrtValue.ortvalue_from_shape_and_type([1, h, w, 3], np.uint8, dev, 0)
            y = ort.OrtValue.ortvalue_from_shape_and_type([1, len(self.classes)], np.float32, dev, 0)
            binding = self.session.io_binding()
            binding.bind_ortvalue_input(C.IMAGE, x)
            binding.bind_ortvalue_output(C.PROBABILITIES, y)
        except Exception:  # noqa: BLE001 - an onnxruntime without IO binding for this device
            return lambda img: self.probabilities(img[None])[0]
        if dev == "cpu":
            view = x.numpy()  # the input buffer itself, on the host

            def run(img):
                view[0] = img
                self.session.run_with_iobinding(binding)
                return y.numpy()[0].copy()  # the output buffer is reused by the next frame
        else:
            def run(img):
                x.update_inplace(np.ascontiguousarray(img[None]))
                self.session.run_with_iobinding(binding)
                return y.numpy()[0]
        return run


def load_model(path: str | os.PathLike, device: str = "auto", threads: int | None = None,
               spin: bool = True) -> Model:
    """Load an edgetl model.onnx; ModelError when it is missing, not ONNX, not an edgetl model, or its
    metadata does not match its graph (class names, input size, preprocessing).

    spin=False suits loops where another thread (capture, decoding) needs the CPU between runs.
    """
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"model not found: {p}")
    sess = session(p, device, threads, spin)
    meta = read_metadata(sess)
    if meta.get(C.KEY_FORMAT) != C.FORMAT_MODEL:
        kind = meta.get(C.KEY_FORMAT)
        what = f"an edgetl {kind}, not a fused model" if kind else "not an edgetl model (no edgetl metadata)"
        raise ModelError(f"{p}: {what}")
    spec = check_io(sess, meta, p, C.PROBABILITIES)
    n_out = static_dim(sess.get_outputs()[0].shape, 1)
    try:
        classes = json.loads(meta[C.KEY_CLASSES])
    except KeyError:
        raise ModelError(f"{p}: edgetl metadata is incomplete (no class names)") from None
    except (ValueError, RecursionError):
        raise ModelError(f"{p}: the class names in its metadata are not a list of names (invalid JSON)") from None
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes):
        raise ModelError(f"{p}: the class names in its metadata are not a list of names")
    if len(set(classes)) != len(classes):
        raise ModelError(f"{p}: its metadata repeats a class name")
    if n_out is not None and len(classes) != n_out:
        raise ModelError(f"{p}: its metadata names {len(classes)} classes but the graph outputs {n_out} "
                         "probabilities; the file was altered")
    return Model(str(p), sess, classes, spec, meta)


def training_warnings(model: Model) -> list[str]:
    """Warnings about how the model was trained, from what it records: imbalanced training photos (and
    what training did about them). Empty when the model records nothing readable."""
    try:
        counts = json.loads(model.metadata.get(C.KEY_TRAINING, "{}"))["counts"]["train"]
        balance = json.loads(model.metadata.get(C.KEY_HEAD, "{}")).get("balance")
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return []
    if not isinstance(counts, dict) or not isinstance(balance, (str, type(None))):
        return []
    return imbalance_warnings(counts, balance)


@dataclasses.dataclass
class Selection:
    """The labelled images of a folder that one split of a model's data stands for."""

    items: list  # data.scan.Item, each with a label among the model's classes
    split: str  # "val" | "train" | "test" | "all"
    note: str  # one line for the user: what was scored and why
    trained_on: int | None = None  # how many selected photos the model was trained on (None: unknown)


def recorded_split(model: Model) -> dict | None:
    """The split train-head recorded in the model: {"train": set of key prefixes, "val": …, "note": …}."""
    raw = model.metadata.get(C.KEY_SPLIT)
    if raw is None:
        return None
    try:
        d = json.loads(raw)
        return {"train": decode_keys(d["train"]), "val": decode_keys(d["val"]), "note": str(d.get("note", ""))}
    except (ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{model.path}: the recorded split is unreadable ({e})") from None


def _content_keys(items) -> list[bytes | None]:
    """The short content key of each item's file (None if unreadable)."""
    def key(it):
        try:
            with open(it.path, "rb") as f:
                return short(hashlib.sha256(f.read()).digest())
        except OSError:
            return None

    return [k for _, k in prefetch_map(key, items)]


def select_split(model: Model, data: str | os.PathLike, split: str = "auto") -> Selection:
    """The images of `data` in `split` ("auto", "val", "train", "test" or "all") for `model`.

    auto/val: the folder's val/ when it has one; else the validation photos train-head recorded in the
    model (by content: renames and moves do not matter); photos the model never saw when none of those
    are here. train: the photos the model was trained on. all: everything (with a count of the
    training photos among them). DataError when nothing fits, or a class is not the model's.
    """
    ds = scan(data)
    if not ds.classes:
        raise DataError(f"{data} has no class folders to evaluate against")
    unknown = sorted({it.label for it in ds.items} - set(model.classes))
    if unknown:
        raise DataError(f"class {unknown[0]!r} of {data} is not one of the model's classes ({', '.join(model.classes)})")
    rec = recorded_split(model)
    want = "val" if split == "auto" else split
    trained_on = None
    if want == "all" or ds.layout == "split":
        items = ds.items if want == "all" else [it for it in ds.items if it.split == want]
        if not items:
            raise DataError(f"{data} has no {want}/ folder")
        note = f"every photo in {data}" if want == "all" else f"the {want}/ folder of {data}"
        if rec:
            trained_on = sum(k in rec["train"] for k in _content_keys(items))
            if trained_on and want != "train":
                note += f"; {trained_on} of them were used for training"
        elif want == "all":
            note += " (the model records no split: training photos may be among them)"
    elif want == "test":
        raise DataError(f"{data} has no test/ folder")
    elif rec:  # class folders: the split recorded in the model, by content
        keys = _content_keys(ds.items)
        items = [it for it, k in zip(ds.items, keys) if k in rec[want]]
        note = f"the {len(items)} {'validation' if want == 'val' else 'training'} photos recorded in the model"
        trained_on = len(items) if want == "train" else 0
        if want == "val" and not items:  # another folder: score what the model never saw
            items = [it for it, k in zip(ds.items, keys) if k not in rec["train"]]
            note = f"the {len(items)} photos of {data} that the model was not trained on"
        if not items:
            raise DataError(f"every photo in {data} was used to train this model: no honest score "
                            "(--split all scores them anyway)")
    else:
        if split != "auto":
            raise DataError(f"{data} has no {want}/ folder and the model records no split; use --split all")
        items = ds.items
        note = f"every photo in {data} (the model records no split: training photos may be among them)"
    return Selection(items, want, note, trained_on)


def evaluate(model: Model, data: str | os.PathLike, split: str = "auto", batch_size: int = 32, rows: list | None = None):
    """Accuracy, per-class metrics and confusion matrix of `model` on a labelled folder.

    split: as `select_split`. Returns (metrics dict, skipped [(path, reason)], Selection). Torch-free.
    `rows`, when given, receives (path, true class index, probabilities) for every scored photo.
    """
    sel = select_split(model, data, split)
    label_of = {it.path: model.classes.index(it.label) for it in sel.items}
    y_true, y_pred, skipped = [], [], []
    for paths, batch, errors in image_batches([it.path for it in sel.items], model.spec, batch_size):
        skipped += errors
        if batch is not None:
            probs = model.probabilities(batch)
            y_pred += probs.argmax(1).tolist()
            y_true += [label_of[p] for p in paths]
            if rows is not None:
                rows += [(p, label_of[p], row) for p, row in zip(paths, probs)]
    return metrics(y_true, y_pred, model.classes), skipped, sel


def expand_paths(patterns) -> list[Path]:
    """Files, folders (every image below) and globs → image paths, in a stable order."""
    out: list[Path] = []
    for pat in patterns:
        p = Path(pat)
        if p.is_dir():
            out += images_under(p)
        elif p.is_file():
            out.append(p)
        else:
            hits = sorted(glob.glob(str(pat), recursive=True))
            if not hits:
                raise DataError(f"no such file, folder or glob match: {pat}")
            out += [Path(h) for h in hits if Path(h).is_file()]
    return out


VIDEO_SUFFIXES = {".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".wmv", ".mpg", ".mpeg", ".ts", ".3gp"}


def is_video(path) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def predict(model: Model, paths: list[Path], top_k: int = 1, batch_size: int = 32):
    """Yield (path, [(class, probability)…top_k] or None, error or None) per image, in order."""
    k = max(1, min(top_k, len(model.classes)))
    for ok, batch, errors in image_batches(list(enumerate(paths)), model.spec, batch_size, path=lambda t: t[1]):
        rows = [(i, p, None, err) for (i, p), err in errors]
        if batch is not None:
            for (i, p), row in zip(ok, model.probabilities(batch)):
                order = np.argsort(-row, kind="stable")[:k]
                rows.append((i, p, [(model.classes[j], float(row[j])) for j in order], None))
        for _, p, top, err in sorted(rows, key=lambda r: r[0]):  # input order
            yield p, top, err
