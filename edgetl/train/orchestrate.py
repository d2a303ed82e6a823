"""`edgetl train-head`: cache → trained head (or top blocks + head) → verified model.onnx, metrics, plots, card.

Regimes (`unfreeze`), one module each: "0" (train/frozen.py) trains a head on cached embeddings; "N"
(train/top.py) cuts the backbone before its last N blocks, caches the frozen trunk's activation maps, and
trains those blocks (from their pretrained weights) plus a head on them; "all" (train/full.py) fine-tunes
the whole network on augmented raw images; "auto" (train/auto.py) measures the candidates on inner folds
of the training photos within a budget. train/finish.py fuses, verifies and writes the output set.
"""

from __future__ import annotations

from edgetl import contract as C
from edgetl.data.embed import embed_folder
from edgetl.data.sources import scan
from edgetl.data.split import make_split
from edgetl.errors import DataError
from edgetl.export.graph import load, metadata
from edgetl.files import check_parent_writable
from edgetl.train import auto
from edgetl.train.depths import multi_backbone, train_multi
from edgetl.train.finish import finish
from edgetl.train.frozen import train_frozen
from edgetl.train.full import train_all
from edgetl.train.request import Job, TrainRequest, TrainResult, check_classes, counts, labels
from edgetl.train.top import cut_backbone, train_top


def train_head(req: TrainRequest, log=lambda s: None) -> TrainResult:
    """Run the whole second step; returns where the output set went and its summary (metrics.json)."""
    scanned = scan(req.data, exclude=[req.out, req.cache],  # refuse unusable data before any work
                   endpoint_url=req.engine.endpoint_url if req.engine else None)
    check_classes(scanned, list(range(len(scanned.items))))
    for line in scanned.notes:
        log(line)
    backbone = load(req.backbone, C.FORMAT_BACKBONE)
    bmeta = metadata(backbone)
    check_parent_writable(req.out)
    cfg, unfreeze, augment, features, choice = req.head, req.unfreeze, req.augment, req.features, None
    backbone_path = req.backbone
    if features == "multi" and unfreeze not in ("0", "auto"):
        raise DataError("--features multi trains a head on frozen features: use it with --unfreeze 0 (or auto)")
    if features == "multi" and unfreeze == "0" and C.KEY_DEPTHS not in bmeta:  # the multi-depth export, made once
        backbone_path = multi_backbone(bmeta, req.weights, req.cache, log)
        backbone = load(backbone_path, C.FORMAT_BACKBONE)
        bmeta = metadata(backbone)
    if unfreeze == "auto":  # measured on the training photos, within the budget
        choice = auto.search(req, scanned, backbone, bmeta, log)
        unfreeze, augment, cfg, features = choice.unfreeze, choice.augment, choice.cfg, choice.features
        log(f"--unfreeze auto: {choice.chosen} ({choice.reason})")
        if features == "multi":
            backbone_path = choice.backbone
            backbone = load(backbone_path, C.FORMAT_BACKBONE)
            bmeta = metadata(backbone)
    cut = None
    if unfreeze not in ("0", "all"):  # embed with the trunk straight away: one pass over the images
        cut = cut_backbone(int(unfreeze), bmeta, req.weights, req.cache, len(scanned.items) * (1 + augment), log)
    r = embed_folder(scanned, cut.path if cut else backbone_path, req.cache, device=req.device,
                     check_space=cut is not None, engine=req.engine)
    log(f"{'trunk activations' if cut else 'embedded'}: {r.summary()}")
    for line in r.namespace.problems:
        log(line)
    for line in r.skipped_lines():
        log(f"skipped{line}")
    ds = r.dataset
    usable = [i for i, k in enumerate(r.keys) if k is not None]
    check_classes(ds, usable)
    split = make_split(ds, r.keys, usable, req.val_fraction, cfg.seed)
    for line in split.notes:
        log(line)
    missing = [c for c, n in counts(ds, split.train).items() if n == 0]
    if missing:
        raise DataError(f"class {missing[0]!r} has no training images")
    job = Job(ds, split, labels(ds, split.train), labels(ds, split.val), cfg, augment, req.cache, req.device,
              req.torch_device, req.batch_size, log)
    if features == "multi":
        t = train_multi(job, r, backbone, bmeta, backbone_path)
    elif unfreeze == "0":
        t = train_frozen(job, r, backbone, bmeta, req.backbone)
    elif unfreeze == "all":
        t = train_all(job, bmeta, req.weights, req.train_bn, recipe=req.recipe)
    else:
        t = train_top(job, cut, r, req.train_bn)
    log(f"trained ({t.regime}): best epoch {t.fit.best_epoch} of {t.fit.epochs_run}, {t.fit.seconds:.1f} s "
        f"on {t.fit.device}")
    return finish(req, t, job, r, choice, log)
