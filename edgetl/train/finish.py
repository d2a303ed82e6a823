"""The last step of every regime: fuse, verify fused vs chained on every validation photo, score the fused
model, record the split in it, and write the whole output set at once (a failure leaves the previous set)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnxruntime

from edgetl import __version__
from edgetl import contract as C
from edgetl.data.pipeline import image_batches
from edgetl.data.split import record
from edgetl.errors import DataError, GateRefused
from edgetl.export.fuse import check_fused, fuse
from edgetl.export.graph import metadata, set_metadata, sha256_bytes
from edgetl.export.quantize import gate_line, quantize_model
from edgetl.files import output_set, write_bytes, write_text
from edgetl.quality import metrics as M
from edgetl.spec import Spec
from edgetl.train import card
from edgetl.train.request import Job, Trained, TrainRequest, TrainResult, counts


def finish(req: TrainRequest, t: Trained, job: Job, r, choice=None, log=lambda s: None) -> TrainResult:
    """Fuse `t`, verify and score it on `job`'s validation photos, and write the output set to req.out."""
    import onnx
    import torch

    ds, split, cfg, out = job.ds, job.split, job.cfg, Path(req.out)
    fused = fuse(t.first, t.second)
    fmeta = metadata(fused)
    spec = Spec.from_json(fmeta[C.KEY_PREPROCESS])
    val_paths = [ds.items[i].path for i in split.val]
    bad: list = []

    def val_batches():
        for _, batch, errors in image_batches(val_paths, spec, req.batch_size):
            bad.extend(errors)  # cannot happen: these images were decoded moments ago
            if batch is not None:
                yield batch

    worst, n_checked, probs = check_fused(fused, t.first, t.second, val_batches())
    if bad:
        raise DataError(f"validation image became unreadable: {bad[0][1]}")
    if not probs:  # no validation images (tiny classes): check on training images instead
        _, batch, _ = next(image_batches([ds.items[i].path for i in split.train[:8]], spec, 8))
        worst, n_checked, _ = check_fused(fused, t.first, t.second, [batch])
    pred = np.concatenate(probs).argmax(1) if probs else np.zeros(0, int)
    m = M.metrics(job.y_val, pred, ds.classes)
    train_counts = counts(ds, split.train)
    warnings = M.warnings(m) + M.imbalance_warnings(train_counts, cfg.balance)

    second_bytes = t.second.SerializeToString()
    cut = json.loads(fmeta[C.KEY_CUT]) if C.KEY_CUT in fmeta else None
    summary = {
        "name": out.resolve().name, "data": str(req.data), "split_note": split.note,
        "backbone": fmeta[C.KEY_BACKBONE], "regime": t.regime, "auto_reason": choice.reason if choice else None,
        "search": choice.record() if choice else None,
        "link": (f"activation maps {cut['shape']} after block {cut['block']}" if cut
                 else f"embeddings of size {fmeta.get(C.KEY_EMBEDDING_DIM)}"),
        "features": t.features or {"kind": "last"},
        "input_size": list(spec.input_size), "classes": ds.classes,
        "counts": {"train": train_counts, "val": counts(ds, split.val)},
        "skipped": [str(p) for p, _ in r.skipped], "head": cfg.describe(), "best_epoch": t.fit.best_epoch,
        "epochs_run": t.fit.epochs_run, "train_seconds": t.fit.seconds, "device": t.fit.device,
        "class_weights": ({c: round(w, 4) for c, w in zip(ds.classes, t.fit.class_weights)}
                          if t.fit.class_weights else f"none ({cfg.balance})"),
        "metrics": m, "warnings": warnings, "notes": ds.notes + split.notes, "leaked_val_photos": split.leaked,
        "parity_images": n_checked, "fuse_max_abs_diff": worst, "fuse_atol": C.FUSE_ATOL,
        "head_max_abs_diff": t.second_diff, "model_sha256": None, "head_sha256": sha256_bytes(second_bytes),
        "backbone_sha256": sha256_bytes(t.first.SerializeToString()),
        "weights_sha256": fmeta.get(C.KEY_WEIGHTS_SHA256), "edgetl": __version__, "torch": torch.__version__,
        "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "history": t.fit.history,
    }
    training = {k: summary[k] for k in ("data", "split_note", "counts", "regime", "best_epoch", "epochs_run")}
    training.update(val_accuracy=m["accuracy"], val_balanced_accuracy=m["balanced_accuracy"], val_n=m["n"])
    set_metadata(fused, {C.KEY_TRAINING: json.dumps(training, ensure_ascii=False),
                         C.KEY_SPLIT: json.dumps(record(split, r.keys))})
    fused_bytes = fused.SerializeToString()
    summary["model_sha256"] = sha256_bytes(fused_bytes)
    quantized = int8_copy(fused, req.data, summary, log) if req.int8 else None

    with output_set(out) as tmp:
        if cut is not None:  # unfreeze N: the frozen trunk and the trained top
            write_bytes(tmp / "trunk.onnx", t.first.SerializeToString())
            write_bytes(tmp / "top.onnx", second_bytes)
        else:
            write_bytes(tmp / "head.onnx", second_bytes)
            if t.regime.startswith("whole network"):  # the fine-tuned network is a new backbone
                write_bytes(tmp / "backbone.onnx", t.first.SerializeToString())
        write_bytes(tmp / "model.onnx", fused_bytes)
        if quantized is not None:
            write_bytes(tmp / "model.int8.onnx", quantized)
        if split.saved:
            write_text(tmp / "split.json", M.dumps(
                {"note": split.note, "train": [_rel(ds, i) for i in split.train], "val": [_rel(ds, i) for i in split.val]}))
        write_text(tmp / "metrics.json", M.dumps(summary))
        card.plot_confusion(m, tmp / "confusion.png")
        card.plot_curves(t.fit.history, t.fit.best_epoch, tmp / "curves.png")
        write_text(tmp / "MODEL_CARD.md", card.model_card(summary))
    summary["out"] = out
    return TrainResult(out, summary)


def int8_copy(fused, data, summary: dict, log) -> bytes | None:
    """`--int8`: the int8 copy through the same gate as `edgetl quantize`; its outcome goes in the summary."""
    log("int8: calibrating on training photos, then checking on the validation photos")
    try:
        q = quantize_model(fused, data, "int8", log=log)
    except GateRefused as e:
        summary["int8"] = {"written": False, "reason": str(e), **(getattr(e, "summary", None) or {})}
        log(f"int8: not written: {e}")
        return None
    summary["int8"] = {"written": True, "line": gate_line(q.summary), **q.summary}
    log(f"int8: {gate_line(q.summary)}")
    return q.data


def _rel(ds, i) -> str:
    return os.path.relpath(ds.items[i].path, ds.root)
