"""`edgetl train-head`: cache → head → head.onnx → fused, verified model.onnx, metrics, plots, card."""

from __future__ import annotations

import dataclasses
import json
import os
import random
from pathlib import Path

import numpy as np

from . import __version__
from . import contract as C
from .errors import DataError
from .files import write_bytes, write_text, writable_dir
from .head import HeadConfig


@dataclasses.dataclass
class Split:
    train: list[int]  # indices into dataset items
    val: list[int]
    note: str
    saved: bool  # made here (and saved to split.json), not read from the folder layout


def make_split(ds, usable: list[int], val_fraction: float, seed: int) -> Split:
    """The dataset's own train/val split when it has one, else a stratified split with `seed`."""
    if ds.layout == "split":
        train = [i for i in usable if ds.items[i].split == "train"]
        val = [i for i in usable if ds.items[i].split == "val"]
        if val:
            return Split(train, val, "the dataset's own train/ and val/ split", False)
        usable = train
    rng = random.Random(seed)
    train, val = [], []
    for c in ds.classes:
        idx = [i for i in usable if ds.items[i].label == c]
        rng.shuffle(idx)
        n_val = int(round(val_fraction * len(idx))) if len(idx) >= 2 else 0
        n_val = min(max(n_val, 1 if len(idx) >= 2 else 0), len(idx) - 1)
        val += idx[:n_val]
        train += idx[n_val:]
    return Split(sorted(train), sorted(val), f"stratified {val_fraction:.0%} validation split, seed {seed}", True)


def check_classes(ds, usable: list[int]) -> None:
    if not ds.classes:
        raise DataError(f"{ds.root} has no class folders: put images in {ds.root}/<class>/")
    if len(ds.classes) < 2:
        raise DataError(f"only one class ({ds.classes[0]!r}) in {ds.root}: a classifier needs at least two")
    have = {ds.items[i].label for i in usable}
    empty = [c for c in ds.classes if c not in have]
    if empty:
        raise DataError(f"class {empty[0]!r} has no readable images" + (f" (nor {len(empty) - 1} more)" if len(empty) > 1 else ""))


def train_head(data, backbone_path, cache_root, out_dir, cfg: HeadConfig, device: str = "auto",
               val_fraction: float = 0.2, batch_size: int = 32, log=lambda s: None) -> dict:
    """Run the whole second step; returns the training summary (also written as metrics.json)."""
    import onnx
    import onnxruntime
    import torch

    from . import fuse, report
    from .embed import embed_folder
    from .export import sha256_bytes
    from .pipeline import image_batches
    from .preprocess import Spec

    from .data import scan

    scanned = scan(data)  # refuse unusable data before any work
    check_classes(scanned, list(range(len(scanned.items))))
    out = writable_dir(out_dir)
    r = embed_folder(data, backbone_path, cache_root, device=device, batch_size=batch_size)
    log(f"embedded: {r.summary()}")
    for line in r.skipped_lines():
        log(f"skipped{line}")
    ds = r.dataset
    usable = [i for i, k in enumerate(r.keys) if k is not None]
    check_classes(ds, usable)
    split = make_split(ds, usable, val_fraction, cfg.seed)
    train_classes = {ds.items[i].label for i in split.train}
    if train_classes != set(ds.classes):
        missing = sorted(set(ds.classes) - train_classes)
        raise DataError(f"class {missing[0]!r} has no training images")
    cls_index = {c: i for i, c in enumerate(ds.classes)}
    _, x_train = r.namespace.load([r.keys[i] for i in split.train])
    _, x_val = r.namespace.load([r.keys[i] for i in split.val])
    y_train = np.array([cls_index[ds.items[i].label] for i in split.train])
    y_val = np.array([cls_index[ds.items[i].label] for i in split.val])

    from .head import train

    tr = train(x_train, y_train, x_val, y_val, len(ds.classes), cfg,
               device=None if device == "auto" else ("cuda" if device == "cuda" else "cpu"))
    log(f"trained {cfg.kind} head: best epoch {tr.best_epoch} of {tr.epochs_run}, {tr.seconds:.1f} s on {tr.device}")

    backbone = fuse.load(backbone_path, C.FORMAT_BACKBONE)
    bmeta = {p.key: p.value for p in backbone.metadata_props}
    head_model, head_diff = fuse.export_head(tr.head, x_train.shape[1], ds.classes, {
        C.KEY_BACKBONE: bmeta[C.KEY_BACKBONE], C.KEY_FINGERPRINT: bmeta[C.KEY_FINGERPRINT],
        C.KEY_HEAD: json.dumps(cfg.describe())})
    fused = fuse.fuse(backbone, head_model)

    # Verify fused == chained on every validation image; the reported metrics are the fused model's.
    spec = Spec.from_json(bmeta[C.KEY_PREPROCESS])
    val_paths = [ds.items[i].path for i in split.val]
    bad: list = []

    def val_batches():
        for _, batch, errors in image_batches(val_paths, spec, batch_size):
            bad.extend(errors)  # cannot happen: these images were decoded moments ago
            if batch is not None:
                yield batch

    worst, n_checked, probs = fuse.check_fused(fused, backbone, head_model, val_batches())
    if bad:
        raise DataError(f"validation image became unreadable: {bad[0][1]}")
    if not probs:  # no validation images (tiny classes): check on training images instead
        _, batch, _ = next(image_batches([ds.items[i].path for i in split.train[:8]], spec, 8))
        worst, n_checked, _ = fuse.check_fused(fused, backbone, head_model, [batch])
    pred = np.concatenate(probs).argmax(1) if probs else np.zeros(0, int)
    m = report.metrics(y_val, pred, ds.classes)

    fused_bytes, head_bytes = fused.SerializeToString(), head_model.SerializeToString()
    name = out.resolve().name
    summary = {
        "name": name, "data": str(data), "split_note": split.note, "backbone": bmeta[C.KEY_BACKBONE],
        "dim": int(x_train.shape[1]), "input_size": list(spec.input_size), "classes": ds.classes,
        "counts": {"train": _counts(ds, split.train), "val": _counts(ds, split.val)},
        "skipped": [str(p) for p, _ in r.skipped], "head": cfg.describe(), "best_epoch": tr.best_epoch,
        "epochs_run": tr.epochs_run, "train_seconds": tr.seconds, "device": tr.device,
        "class_weights": ({c: round(w, 4) for c, w in zip(ds.classes, tr.class_weights)}
                          if tr.class_weights else "off"),
        "metrics": m, "parity_images": n_checked, "fuse_max_abs_diff": worst, "fuse_atol": C.FUSE_ATOL,
        "head_max_abs_diff": head_diff, "model_sha256": None, "head_sha256": sha256_bytes(head_bytes),
        "backbone_sha256": sha256_bytes(backbone.SerializeToString()),
        "weights_sha256": bmeta.get(C.KEY_WEIGHTS_SHA256), "edgetl": __version__, "torch": torch.__version__,
        "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "history": tr.history,
    }
    from .export import set_metadata

    training = {k: summary[k] for k in ("data", "split_note", "counts", "best_epoch", "epochs_run", "class_weights")}
    training["val_accuracy"] = m["accuracy"]
    set_metadata(fused, {C.KEY_TRAINING: json.dumps(training, ensure_ascii=False)})
    fused_bytes = fused.SerializeToString()
    summary["model_sha256"] = sha256_bytes(fused_bytes)

    write_bytes(out / "head.onnx", head_bytes)
    write_bytes(out / "model.onnx", fused_bytes)
    if split.saved:
        write_text(out / "split.json", report.dumps(
            {"note": split.note, "train": [_rel(ds, i) for i in split.train], "val": [_rel(ds, i) for i in split.val]}))
    write_text(out / "metrics.json", report.dumps({k: v for k, v in summary.items()}))
    if len(split.val):
        report.plot_confusion(m, out / "confusion.png")
    report.plot_curves(tr.history, tr.best_epoch, out / "curves.png")
    write_text(out / "MODEL_CARD.md", report.model_card(summary))
    summary["out"] = out
    return summary


def _counts(ds, idx) -> dict[str, int]:
    out = {c: 0 for c in ds.classes}
    for i in idx:
        out[ds.items[i].label] += 1
    return out


def _rel(ds, i) -> str:
    return os.path.relpath(ds.items[i].path, ds.root)


def default_out(data) -> Path:
    return Path("exports") / (Path(data).resolve().name or "model")
