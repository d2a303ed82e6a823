"""Regime "0": a head on the frozen backbone's cached embeddings (plus K cached augmented views)."""

from __future__ import annotations

import json

import numpy as np

from edgetl import contract as C
from edgetl.data.embed import embed_folder
from edgetl.export.fuse import export_head
from edgetl.train.heads import train
from edgetl.train.request import Job, Trained, rows


def aug_views(model_path, job: Job, check_space: bool = False) -> list:
    """Bring the cache up to date for `job.augment` augmented views of the training images (one namespace each)."""
    views = []
    for v in range(job.augment):
        rv = embed_folder(job.ds, model_path, job.cache_root, device=job.device, batch_size=job.batch_size,
                          view=f"aug{v}", only=job.split.train, check_space=check_space)
        job.log(f"augmented view {v + 1}/{job.augment}: {rv.new} new, {rv.reused} reused")
        views.append(rv)
    return views


def train_frozen(job: Job, r, backbone, bmeta: dict, backbone_path) -> Trained:
    """Train the head on embed result `r` (and its augmented views); export it, checked."""
    cfg, split = job.cfg, job.split
    views = [r] + aug_views(backbone_path, job)
    x_train = np.concatenate([rows(v, split.train) for v in views])
    y_all = np.concatenate([job.y_train] * len(views))
    tr = train(x_train, y_all, rows(r, split.val), job.y_val, len(job.ds.classes), cfg, device=job.torch_device,
               log=job.log)
    head_model, diff = export_head(tr.model, x_train.shape[1], job.ds.classes, {
        C.KEY_BACKBONE: bmeta[C.KEY_BACKBONE], C.KEY_FINGERPRINT: bmeta[C.KEY_FINGERPRINT],
        C.KEY_HEAD: json.dumps(cfg.describe())})
    return Trained(backbone, head_model, diff, tr,
                   f"{cfg.kind} head, frozen backbone" + (f", {job.augment} augmented views" if job.augment else ""))
