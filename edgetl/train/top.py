"""Regime "N": cut the backbone before its last N blocks, cache the frozen trunk's activation maps, and
train those blocks (from their pretrained weights) plus a head on them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from edgetl import contract as C
from edgetl.export.graph import metadata
from edgetl.export.stages import verified_stages
from edgetl.files import write_bytes
from edgetl.train import heads
from edgetl.train.cut import cut_index, export_top, export_trunk, top_and_head, torch_backbone
from edgetl.train.finetune import device_batch, fit, tensor_batches
from edgetl.train.frozen import aug_views
from edgetl.train.request import Job, Trained, rows


@dataclasses.dataclass
class Cut:
    backbone: object  # backbones.Backbone
    stages: object  # cut.Stages
    block: int  # index of the first trained block
    unfreeze: int
    trunk: object  # onnx.ModelProto: image → activation
    shape: list[int]
    path: Path  # the trunk's file in the cache folder
    meta: dict[str, str]


def cut_backbone(n_unfreeze: int, bmeta, weights, cache_root, images: int, log) -> Cut:
    """Cut the PyTorch backbone before its last N blocks; export (and keep) the checked trunk."""
    bb = torch_backbone(bmeta, weights)
    st = verified_stages(bb)
    k = cut_index(st, n_unfreeze, bb.name)
    trunk, shape = export_trunk(bb, st, k)
    tmeta = metadata(trunk)
    path = Path(cache_root) / "trunks" / f"{tmeta[C.KEY_FINGERPRINT]}.onnx"
    if not path.exists():
        write_bytes(path, trunk.SerializeToString())
    per_image = int(np.prod(shape)) * 2  # float16
    log(f"cut {bb.name} before block {k} of {len(st.blocks)}: activation {shape}, "
        f"{per_image / 1e3:.0f} kB per image in the cache, at most {per_image * images / 1e6:.0f} MB in all")
    return Cut(bb, st, k, n_unfreeze, trunk, shape, path, tmeta)


def train_top(job: Job, cut: Cut, center, train_bn: bool, export: bool = True) -> Trained:
    """Train the last blocks + head on the cached activation maps `center` (an embed result of the trunk)."""
    import torch

    cfg, split = job.cfg, job.split
    bb, st, k, shape, tmeta, n_unfreeze = cut.backbone, cut.stages, cut.block, cut.shape, cut.meta, cut.unfreeze
    views = [center] + aug_views(cut.path, job, True)
    x_train = np.concatenate([rows(v, split.train) for v in views]).reshape(-1, *shape).astype(np.float16)
    y_all = np.concatenate([job.y_train] * len(views))
    x_val = rows(center, split.val).reshape(-1, *shape)
    torch.manual_seed(cfg.seed)
    h = heads.build(cfg, bb.dim, len(job.ds.classes))
    top = top_and_head(st, k, h)
    for p in top.parameters():
        p.requires_grad_(True)
    dev = job.torch_device or ("cuda" if torch.cuda.is_available() else "cpu")
    top.to(dev)
    bs, lr = device_batch(dev, cfg.lr)
    params = [{"params": list(top.blocks.parameters()) + list(top.tail.parameters()), "lr": lr * 0.1},
              {"params": list(top.head.parameters()), "lr": lr}]
    box = [0]
    res = fit(top, tensor_batches(x_train, y_all, bs, True, cfg.seed, box, dev),
              tensor_batches(x_val, job.y_val, 2 * bs, False, 0, [0], dev), job.y_val, len(job.ds.classes), y_all,
              params, cfg, epochs=min(cfg.max_epochs, 30), patience=min(cfg.patience, 5), train_bn=train_bn, device=dev,
              log=job.log)
    if not export:  # --unfreeze auto's inner runs: the score is all that is needed
        return Trained(None, None, 0.0, res, "")
    extra = {C.KEY_BACKBONE: bb.name, C.KEY_FINGERPRINT: tmeta[C.KEY_FINGERPRINT], C.KEY_CUT: tmeta[C.KEY_CUT],
             C.KEY_HEAD: json.dumps({**cfg.describe(), "unfreeze": n_unfreeze, "train_bn": train_bn})}
    top_model, diff = export_top(res.model, shape, job.ds.classes, extra)
    return Trained(cut.trunk, top_model, diff, res, f"last {n_unfreeze} blocks + {cfg.kind} head on cached activations"
                   + (f", {job.augment} augmented views" if job.augment else ""))
