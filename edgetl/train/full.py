"""Regime "all": fine-tune the whole network from its pretrained weights on raw images (augmented), then
export the fine-tuned network as a new backbone (its own fingerprint) and the head."""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np

from edgetl import __version__
from edgetl import contract as C
from edgetl.backbones import state_sha256
from edgetl.data.preprocess import load_image
from edgetl.export.fuse import export_head
from edgetl.export.torch_onnx import image_module, to_onnx
from edgetl.train import heads
from edgetl.train.cut import torch_backbone
from edgetl.train.finetune import DEFAULT_RECIPE, TrainImages, device_batch, fit, image_batches, llrd_groups
from edgetl.train.request import Job, Trained


def train_all(job: Job, bmeta: dict, weights, train_bn: bool, export: bool = True, recipe=None) -> Trained:
    import torch

    ds, split, cfg, y_val = job.ds, job.split, job.cfg, job.y_val
    bb = torch_backbone(bmeta, weights)
    spec = bb.spec
    for p in bb.model.parameters():
        p.requires_grad_(True)
    torch.manual_seed(cfg.seed)
    h = heads.build(cfg, bb.dim, len(ds.classes))
    features = image_module(bb)

    class Full(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.features = features
            self.head = h

        def forward(self, image):
            return self.head(self.features(image))

    model = Full()
    dev = job.torch_device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(dev)
    recipe = recipe or DEFAULT_RECIPE
    images = TrainImages([ds.items[i].path for i in split.train], job.y_train, spec, bool(job.augment),
                         trivial_augment=recipe.trivial_augment)
    val_x = np.stack([load_image(ds.items[i].path, spec) for i in split.val]) if split.val else None
    rng = np.random.default_rng(cfg.seed)
    started = time.perf_counter()
    epochs = min(cfg.max_epochs, 15)
    bs, lr = device_batch(dev, cfg.lr)
    train_batches = image_batches(images, bs, rng, dev)

    def val_batches():
        for i in range(0, 0 if val_x is None else len(val_x), 2 * bs):
            yield torch.from_numpy(val_x[i:i + 2 * bs]), torch.from_numpy(y_val[i:i + 2 * bs].astype(np.int64))

    def progress(line):
        ep = int(line.split()[1].split("/")[0])
        eta = (time.perf_counter() - started) / ep * (epochs - ep)
        job.log(f"{line}, ETA {eta:.0f} s (at most)")

    params = (llrd_groups(model, model.features.features, model.head, lr, recipe.llrd) if recipe.llrd else
              [{"params": list(model.features.parameters()), "lr": lr * 0.1},
               {"params": list(model.head.parameters()), "lr": lr}])
    res = fit(model, train_batches, val_batches, y_val, len(ds.classes), job.y_train, params, cfg, epochs=epochs,
              patience=min(cfg.patience, 4), train_bn=train_bn, device=dev, log=progress, recipe=recipe,
              steps_per_epoch=-(-len(images) // bs))
    if not export:
        return Trained(None, None, 0.0, res, "")
    tuned = dataclasses.replace(bb, model=model.features.features)
    tuned.model.eval()
    tuned.weights_sha256 = state_sha256(tuned.model)
    h_, w_ = spec.input_size
    meta = {C.KEY_FORMAT: C.FORMAT_BACKBONE, C.KEY_VERSION: __version__, C.KEY_BACKBONE: f"{bb.name} (fine-tuned)",
            C.KEY_WEIGHTS_SHA256: tuned.weights_sha256, C.KEY_FINGERPRINT: tuned.fingerprint,
            C.KEY_EMBEDDING_DIM: str(bb.dim), C.KEY_PREPROCESS: spec.to_json()}
    first = to_onnx(image_module(tuned), (torch.zeros(2, h_, w_, 3, dtype=torch.uint8),), [C.IMAGE], [C.EMBEDDING], meta)
    head_model, diff = export_head(model.head, bb.dim, ds.classes, {
        C.KEY_BACKBONE: meta[C.KEY_BACKBONE], C.KEY_FINGERPRINT: tuned.fingerprint,
        C.KEY_HEAD: json.dumps({**cfg.describe(), "unfreeze": "all", "augment": bool(job.augment), "train_bn": train_bn,
                                "recipe": recipe.describe()})})
    return Trained(first, head_model, diff, res, "whole network fine-tuned" + (" with augmentation" if job.augment else "")
                   + ("" if recipe == DEFAULT_RECIPE else f" (recipe {recipe.describe()})"))
