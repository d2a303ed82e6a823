"""Regime "0" with `--features multi` (Head-to-Toe): a head on features from several depths of the frozen
backbone, read from the multi-depth backbone's cached rows (export/depths.py).

Which depths: the candidate sets are the usual embedding plus the last k blocks' pooled outputs (k from
DEPTH_STEPS), each measured by k-fold cross-validation of the training photos (by content, stratified;
never the validation photos) with the same head trainer; the smallest set within one standard error of the
best is kept (fewer features, less to overfit). Each block's features are scaled so that their size on the
training photos matches the last layer's (alone, the last layer gives exactly today's head); the selection
and the scaling are inside the exported head (it takes the whole multi-depth row), so the fused model still
takes a uint8 image and gives probabilities.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from edgetl import contract as C
from edgetl.data.split import folds
from edgetl.export.depths import export_multi, fingerprint, read_layout
from edgetl.export.fuse import export_head
from edgetl.train.cut import torch_backbone
from edgetl.train.heads import HeadConfig, train
from edgetl.train.request import Job, Trained, labels, rows

DEPTH_STEPS = (0, 2, 4, 7)  # blocks added to the last layer's embedding, in the candidate sets (7: every block)
FOLDS = 5
MIN_STD = 1e-6


def candidate_sets(depths: list[dict]) -> list[list[dict]]:
    """The usual embedding alone, then with the last k blocks (k in DEPTH_STEPS, at most all of them)."""
    blocks, last = depths[:-1], depths[-1]
    out = []
    for k in DEPTH_STEPS:
        k = min(k, len(blocks))
        chosen = (blocks[len(blocks) - k:] if k else []) + [last]
        if chosen not in out:
            out.append(chosen)
    return out


def columns(chosen: list[dict]) -> np.ndarray:
    return np.concatenate([np.arange(d["start"], d["start"] + d["dim"]) for d in chosen])


def group_scale(x: np.ndarray, chosen: list[dict]) -> np.ndarray:
    """A factor per column of `x` (the chosen depths side by side): each block's columns scaled so that their
    root-mean-square value matches the last layer's, which is left as it is (alone, it is today's head)."""
    dims = [d["dim"] for d in chosen]
    edges = np.cumsum([0] + dims)
    rms = [float(np.sqrt(np.mean(np.square(x[:, a:b])))) for a, b in zip(edges[:-1], edges[1:])]
    ref = rms[-1]
    return np.concatenate([np.full(d, ref / max(r, MIN_STD), np.float32) for d, r in zip(dims, rms)])


def cross_validate(job: Job, r, sets: list[list[dict]], cfg: HeadConfig, k: int = FOLDS) -> list[dict]:
    """Inner k-fold scores of each candidate set on the training photos: [{"depths", "balanced", "folds"}]."""
    ds = job.ds
    inner = [f for f in folds(ds, r.keys, job.split.train, k, cfg.seed + 1)
             if len(set(labels(ds, f.train))) == len(ds.classes)]
    x_all = rows(r, job.split.train)
    where = {i: n for n, i in enumerate(job.split.train)}
    out = []
    for chosen in sets:
        cols, per_fold = columns(chosen), []
        for f in inner:
            tr, va = [where[i] for i in f.train], [where[i] for i in f.val]
            xt, xv = x_all[tr][:, cols], x_all[va][:, cols]
            scale = group_scale(xt, chosen)
            fit = train(xt * scale, labels(ds, f.train), xv * scale, labels(ds, f.val), len(ds.classes), cfg,
                        device="cpu")
            i = max(0, fit.best_epoch - 1)
            per_fold.append((fit.history["val_balanced_acc"][i], len(va)))
        out.append({"depths": [d["name"] for d in chosen], "folds": len(per_fold),
                    "balanced": float(np.mean([p for p, _ in per_fold])) if per_fold else None,
                    "photos": int(sum(n for _, n in per_fold))})
    return out


def choose(scores: list[dict]) -> tuple[int, str]:
    """Index of the set kept: the smallest within one standard error of the best (binomial, on the best's
    inner photos), else the best; with no inner folds, the usual embedding alone."""
    scored = [(i, s) for i, s in enumerate(scores) if s["balanced"] is not None]
    if not scored:
        return 0, "too few training photos to compare depths: the last layer alone"
    b, best = max(scored, key=lambda t: t[1]["balanced"])
    p, n = best["balanced"], max(best["photos"], 1)
    se = max(float(np.sqrt(p * (1 - p) / n)), 1 / n)
    for i, s in scored:  # sets grow with i: the first within one standard error has the fewest features
        if best["balanced"] - s["balanced"] <= se:
            how = "the best" if i == b else f"within one standard error ({se:.3f}) of the best ({p:.4f})"
            return i, f"{how}: inner balanced accuracy {s['balanced']:.4f} over {s['folds']} folds"
    return b, "the best"


def multi_backbone(bmeta: dict, weights, cache_root, log) -> Path:
    """The multi-depth export of the backbone that `bmeta` describes, kept in the cache folder (made once)."""
    bb = torch_backbone(bmeta, weights)
    path = Path(cache_root) / "depths" / f"{fingerprint(bb)}.onnx"
    if not path.is_file():
        log(f"exporting the multi-depth {bb.name} to {path} (checked against PyTorch)")
        export_multi(bb, path)
    return path


def fit_depths(job: Job, r, depths: list[dict], inner_folds: int = FOLDS):
    """Choose the depths on inner folds of `job`'s training photos, then train the head on all of them.
    Returns (chosen depths, column indices, per-column scale, the fit, {"how", "candidates"})."""
    cfg, split = job.cfg, job.split
    sets = candidate_sets(depths)
    scores = cross_validate(job, r, sets, cfg, inner_folds)
    k, why = choose(scores)
    chosen = sets[k]
    for s in scores:
        bal = f"{s['balanced']:.4f}" if s["balanced"] is not None else "-"
        job.log(f"  depths {'+'.join(s['depths'])}: inner balanced accuracy {bal} ({s['folds']} folds)")
    cols = columns(chosen)
    x_train, x_val = rows(r, split.train)[:, cols], rows(r, split.val)[:, cols]
    scale = group_scale(x_train, chosen)
    tr = train(x_train * scale, job.y_train, x_val * scale, job.y_val, len(job.ds.classes), cfg,
               device=job.torch_device, log=job.log)
    return chosen, cols, scale, tr, {"how": why, "candidates": scores}


def train_multi(job: Job, r, backbone, bmeta: dict, backbone_path, export: bool = True,
                inner_folds: int = FOLDS) -> Trained:
    """Choose the depths on inner folds, train the head on all training photos, export it (checked)."""
    import torch

    t0 = time.perf_counter()
    cfg, ds = job.cfg, job.ds
    dim = int(bmeta[C.KEY_EMBEDDING_DIM])
    chosen, cols, scale, tr, how = fit_depths(job, r, read_layout(bmeta, dim, backbone_path), inner_folds)
    names = [d["name"] for d in chosen]
    job.log(f"--features multi: {'+'.join(names)} ({how['how']}); {time.perf_counter() - t0:.1f} s")
    if not export:  # --unfreeze auto's inner runs: the score is all that is needed
        return Trained(None, None, 0.0, tr, "")

    class Select(torch.nn.Module):
        """The multi-depth row → the chosen columns, each depth scaled; then the trained head."""

        def __init__(self, head):
            super().__init__()
            self.register_buffer("cols", torch.as_tensor(cols, dtype=torch.long))
            self.register_buffer("scale", torch.as_tensor(scale))
            self.head = head

        def forward(self, x):
            return self.head(torch.index_select(x, 1, self.cols) * self.scale)

    features = {"kind": "multi", "depths": names, "dims": [d["dim"] for d in chosen], "columns": int(len(cols)),
                **how}
    head_model, diff = export_head(Select(tr.model).eval(), dim, ds.classes, {
        C.KEY_BACKBONE: bmeta[C.KEY_BACKBONE], C.KEY_FINGERPRINT: bmeta[C.KEY_FINGERPRINT],
        C.KEY_HEAD: json.dumps({**cfg.describe(), "features": "multi", "depths": names})})
    tr = dataclasses.replace(tr, seconds=time.perf_counter() - t0)
    return Trained(backbone, head_model, diff, tr,
                   f"{cfg.kind} head on {len(names)} depths ({'+'.join(names)}), frozen backbone", features)
