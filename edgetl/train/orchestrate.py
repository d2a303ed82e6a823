"""`edgetl train-head`: cache → trained head (or top blocks + head) → verified model.onnx, metrics, plots, card.

Regimes (`unfreeze`): "0" trains a head on cached embeddings; "N" cuts the backbone before its last N
blocks, caches the frozen trunk's activation maps, and trains those blocks (from their pretrained
weights) plus a head on them; "all" fine-tunes the whole network on augmented raw images; "auto"
chooses from the amount of data (see `choose_regime`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from edgetl import __version__
from edgetl import contract as C
from edgetl.data.split import make_split
from edgetl.errors import DataError
from edgetl.files import check_parent_writable, output_set, write_bytes, write_text
from edgetl.train.heads import HeadConfig

# --unfreeze auto measures (train/search.py); only when the training photos cannot be cut into folds (every
# class a single photo) does it fall back on this rule of thumb: the smallest class's training count → regime.
AUTO_HEAD_BELOW = 200  # fewer per class: a head on frozen features (more layers would overfit)
AUTO_ALL_FROM = 1000  # this many or more per class: fine-tune everything; between: the last 2 blocks


def check_classes(ds, usable: list[int]) -> None:
    """DataError unless DATA has two or more classes, each with at least one readable image."""
    if not ds.classes:
        raise DataError(f"{ds.root} has no class folders: put images in {ds.root}/<class>/")
    if len(ds.classes) < 2:
        raise DataError(f"only one class ({ds.classes[0]!r}) in {ds.root}: a classifier needs at least two")
    have = {ds.items[i].label for i in usable}
    empty = [c for c in ds.classes if c not in have]  # (one pass over the items, then over the classes)
    if empty:
        more = f" (nor {len(empty) - 1} more)" if len(empty) > 1 else ""
        raise DataError(f"class {empty[0]!r} has no readable images{more}")


def choose_regime(per_class: int) -> tuple[str, str]:
    """(unfreeze, reason) for --unfreeze auto, from the smallest class's number of training images."""
    if per_class < AUTO_HEAD_BELOW:
        return "0", f"{per_class} training images in the smallest class (< {AUTO_HEAD_BELOW}): head only"
    if per_class < AUTO_ALL_FROM:
        return "2", f"{per_class} per class ({AUTO_HEAD_BELOW}–{AUTO_ALL_FROM - 1}): fine-tune the last 2 blocks"
    return "all", f"{per_class} per class (>= {AUTO_ALL_FROM}): fine-tune the whole network"


@dataclasses.dataclass
class Trained:
    first: object  # onnx.ModelProto: backbone or trunk
    second: object  # onnx.ModelProto: head or top
    second_diff: float  # its export parity
    fit: object  # head.Fit
    regime: str


def train_head(data, backbone_path, cache_root, out_dir, cfg: HeadConfig, device: str = "auto",
               val_fraction: float = 0.2, batch_size: int = 32, unfreeze: str = "0", augment: int = 0,
               train_bn: bool = False, weights: str | None = None, int8: bool = False, budget_min: float | None = None,
               recipe=None, log=lambda s: None, engine=None) -> dict:
    """Run the whole second step; returns the training summary (also written as metrics.json).
    `engine` (a data.engines.Engine): where the embedding runs, and the endpoint of s3:// data."""
    from edgetl.data.sources import scan
    from edgetl.export import fuse

    scanned = scan(data, exclude=[out_dir, cache_root],  # refuse unusable data before any work
                   endpoint_url=engine.endpoint_url if engine else None)
    check_classes(scanned, list(range(len(scanned.items))))
    for line in scanned.notes:
        log(line)
    backbone = fuse.load(backbone_path, C.FORMAT_BACKBONE)
    bmeta = {p.key: p.value for p in backbone.metadata_props}
    check_parent_writable(out_dir)
    torch_device = None if device == "auto" else ("cuda" if device == "cuda" else "cpu")
    reason, search = "", None
    if unfreeze == "auto":  # measured on the training photos, within the budget
        search = _search(scanned, backbone, bmeta, backbone_path, cache_root, cfg, device, torch_device, val_fraction,
                         weights, train_bn, budget_min, batch_size, log, recipe)
        unfreeze, augment, cfg, reason = search["unfreeze"], search["augment"], search["cfg"], search["reason"]
        log(f"--unfreeze auto: {search['chosen']} ({reason})")
    cut = None
    if unfreeze not in ("0", "all"):  # embed with the trunk straight away: one pass over the images
        cut = _cut(int(unfreeze), bmeta, weights, cache_root, len(scanned.items) * (1 + augment), log)

    from edgetl.data.embed import embed_folder

    r = embed_folder(scanned, cut.path if cut else backbone_path, cache_root, device=device,
                     check_space=cut is not None, engine=engine)
    log(f"{'trunk activations' if cut else 'embedded'}: {r.summary()}")
    for line in r.namespace.problems:
        log(line)
    for line in r.skipped_lines():
        log(f"skipped{line}")
    ds = r.dataset
    usable = [i for i, k in enumerate(r.keys) if k is not None]
    check_classes(ds, usable)
    split = make_split(ds, r.keys, usable, val_fraction, cfg.seed)
    for line in split.notes:
        log(line)
    train_counts = _counts(ds, split.train)
    missing = [c for c, n in train_counts.items() if n == 0]
    if missing:
        raise DataError(f"class {missing[0]!r} has no training images")
    cls_index = {c: i for i, c in enumerate(ds.classes)}
    y_train = np.array([cls_index[ds.items[i].label] for i in split.train])
    y_val = np.array([cls_index[ds.items[i].label] for i in split.val])
    common = dict(ds=ds, split=split, y_train=y_train, y_val=y_val, cfg=cfg, augment=augment,
                  cache_root=cache_root, device=device, torch_device=torch_device, batch_size=batch_size, log=log)
    if unfreeze == "0":
        t = _train_frozen(r, backbone, bmeta, backbone_path, **common)
    elif unfreeze == "all":
        t = _train_all(bmeta, weights, train_bn, recipe=recipe, **common)
    else:
        t = _train_top(cut, r, train_bn, **common)
    log(f"trained ({t.regime}): best epoch {t.fit.best_epoch} of {t.fit.epochs_run}, {t.fit.seconds:.1f} s "
        f"on {t.fit.device}")
    return _finish(t, fuse.fuse(t.first, t.second), data, ds, split, y_val, cfg, Path(out_dir), r, batch_size, reason,
                   int8, log, search)


def _search(scanned, backbone, bmeta, backbone_path, cache_root, cfg, device, torch_device, val_fraction, weights,
            train_bn, budget_min, batch_size, log, recipe=None) -> dict:
    """--unfreeze auto: try the candidate regimes that fit the budget on an inner split of the training
    photos; returns the chosen regime and the table (see train/search.py)."""
    import copy
    import time

    from edgetl.data.embed import embed_folder
    from edgetl.data.split import Split, folds
    from edgetl.deploy.runtime import session
    from edgetl.errors import EdgetlError
    from edgetl.train import search as S
    from edgetl.train.finetune import verified_stages

    t0 = time.perf_counter()
    budget = 60 * (budget_min if budget_min else S.default_budget_min(device))
    r = embed_folder(scanned, backbone_path, cache_root, device=device)
    ds = r.dataset
    usable = [i for i, k in enumerate(r.keys) if k is not None]
    check_classes(ds, usable)
    outer = make_split(ds, r.keys, usable, val_fraction, cfg.seed)
    cls = {c: i for i, c in enumerate(ds.classes)}

    def labels(idx):
        return np.array([cls[ds.items[i].label] for i in idx])

    inner = [Split(f.train, f.val, "inner fold of the training photos", False)
             for f in folds(ds, r.keys, outer.train, S.FOLDS, cfg.seed + 1)]
    inner = [f for f in inner if len(set(labels(f.train))) == len(ds.classes)]
    if not inner:
        unfreeze, why = choose_regime(min(_counts(ds, outer.train).values()))
        return {"unfreeze": unfreeze, "augment": 0, "cfg": cfg, "chosen": f"--unfreeze {unfreeze}", "rows": [],
                "reason": f"too few training photos to measure ({why})", "budget_s": budget}
    sess = session(backbone_path, device, short_job=True)
    h, w = json.loads(bmeta[C.KEY_PREPROCESS])["input_size"]
    x = np.zeros((16, h, w, 3), np.uint8)
    sess.run(None, {C.IMAGE: x})
    t = time.perf_counter()
    sess.run(None, {C.IMAGE: x})
    embed_s = (time.perf_counter() - t) / 16 + 0.003  # + decoding
    bb = _torch_backbone(bmeta, weights)
    st = verified_stages(bb)
    pr = S.probe(bb, st, embed_s, device,
                 [int(c.unfreeze) for c in S.CANDIDATES if c.unfreeze.isdigit() and 0 < int(c.unfreeze) <= len(st.blocks)])
    n_images, n_fold_train, quiet = len(ds.items), len(inner[0].train), (lambda line: None)
    plan = sorted(S.CANDIDATES, key=lambda c: pr.cost(c, n_images, n_fold_train))
    rows = {c: S.Row(c.name, pr.cost(c, n_images, n_fold_train)) for c in plan}
    final = {c: pr.cost(c, n_images, len(outer.train)) for c in plan}  # its run on all training photos
    last = {}  # candidate → seconds of its latest fold (the estimate of its next)
    cuts = {}  # "N" → (Cut, its activation maps' embedding result)
    log(f"--unfreeze auto: up to {len(inner)} folds of the {len(outer.train)} training photos, "
        f"budget {budget / 60:.0f} min")

    def run(c, k: int) -> bool:
        """Fold k of candidate c, when it fits the budget; False when it does not (or failed)."""
        row, fold = rows[c], inner[k]
        # a first fold keeps room for its own final run; a later one for the dearest final run that could win
        reserve = final[c] if not k else max(final[d] for d in plan if rows[d].status == "tried")
        if time.perf_counter() - t0 + last.get(c, row.estimated_s) + reserve > budget:
            if not k:
                row.status = "over budget"
            return False
        started = time.perf_counter()
        args = dict(ds=ds, split=fold, y_train=labels(fold.train), y_val=labels(fold.val),
                    cfg=dataclasses.replace(cfg, kind=c.kind), augment=c.augment, cache_root=cache_root, device=device,
                    torch_device=torch_device, batch_size=batch_size, log=quiet)
        try:
            if c.unfreeze == "0":
                fit = _train_frozen(r, backbone, bmeta, backbone_path, **args).fit
            elif c.unfreeze == "all":
                fit = _train_all(bmeta, weights, train_bn, export=False, recipe=recipe, **args).fit
            else:
                if c.unfreeze not in cuts:  # the trunk and its activation maps serve every fold
                    cut = _cut(int(c.unfreeze), bmeta, weights, cache_root, n_images * (1 + S.AUG), quiet)
                    cuts[c.unfreeze] = cut, embed_folder(ds, cut.path, cache_root, device=device, check_space=True)
                cut, rt = cuts[c.unfreeze]
                fresh = dataclasses.replace(cut, stages=copy.deepcopy(cut.stages))  # each fold from pretrained weights
                fit = _train_top(fresh, rt, train_bn, export=False, **args).fit
        except EdgetlError as e:
            row.fail(str(e))
            return False
        last[c] = time.perf_counter() - started
        row.add(last[c], S.score(fit), len(fold.val))
        if not k:  # measured beats probed: the final run trains on all training photos, not 4/5 of them
            final[c] = last[c] * len(outer.train) / len(fold.train)
        return True

    # Every candidate's first fold, cheapest first; then more folds, candidate by candidate, cheapest first
    # (a head's fold costs seconds, the whole network's minutes: the cheap ones get all their folds).
    for c in plan:
        if c.unfreeze.isdigit() and int(c.unfreeze) > len(st.blocks):
            rows[c].status = f"{bb.name} has {len(st.blocks)} blocks"
        elif run(c, 0):
            log(f"  {c.name}: inner balanced accuracy {rows[c].balanced_accuracy:.4f} on fold 1 ({last[c]:.0f} s)")
    for c in plan:
        if rows[c].status == "tried" and len(inner) > 1:
            k = 1
            while k < len(inner) and run(c, k):
                k += 1
            if k > 1:
                log(f"  {c.name}: mean inner balanced accuracy {rows[c].balanced_accuracy:.4f} over {k} folds")
    top, why = S.choose(rows)
    if top is None:
        raise DataError(f"no candidate regime fits a budget of {budget / 60:.1f} min; give --budget more minutes")
    c = next(c for c in plan if rows[c] is top)
    for line in S.table(list(rows.values())):
        log(line)
    n_tried = sum(x.status == "tried" for x in rows.values())
    return {"unfreeze": c.unfreeze, "augment": c.augment, "cfg": dataclasses.replace(cfg, kind=c.kind), "chosen": c.name,
            "reason": f"{why}: inner balanced accuracy {top.balanced_accuracy:.4f} over {top.folds} folds; {n_tried} "
                      f"candidates tried in {time.perf_counter() - t0:.0f} s of a {budget / 60:.0f} min budget",
            "rows": [dataclasses.asdict(x) for x in rows.values()], "budget_s": budget,
            "inner": {"photos": len(outer.train), "folds": len(inner)}}


def _aug_views(model_path, ds, split, augment, cache_root, device, batch_size, log, check_space=False):
    """Bring the cache up to date for K augmented views of the training images (one namespace each)."""
    from edgetl.data.embed import embed_folder

    views = []
    for v in range(augment):
        rv = embed_folder(ds, model_path, cache_root, device=device, batch_size=batch_size,
                          view=f"aug{v}", only=split.train, check_space=check_space)
        log(f"augmented view {v + 1}/{augment}: {rv.new} new, {rv.reused} reused")
        views.append(rv)
    return views


def _rows(r, idx) -> np.ndarray:
    return r.namespace.load([r.keys[i] for i in idx])[1]


def _train_frozen(r, backbone, bmeta, backbone_path, ds, split, y_train, y_val, cfg, augment, cache_root, device,
                  torch_device, batch_size, log) -> Trained:
    from edgetl.export import fuse
    from edgetl.train.heads import train

    views = [r] + _aug_views(backbone_path, ds, split, augment, cache_root, device, batch_size, log)
    x_train = np.concatenate([_rows(v, split.train) for v in views])
    y_all = np.concatenate([y_train] * len(views))
    tr = train(x_train, y_all, _rows(r, split.val), y_val, len(ds.classes), cfg, device=torch_device, log=log)
    head_model, diff = fuse.export_head(tr.model, x_train.shape[1], ds.classes, {
        C.KEY_BACKBONE: bmeta[C.KEY_BACKBONE], C.KEY_FINGERPRINT: bmeta[C.KEY_FINGERPRINT],
        C.KEY_HEAD: json.dumps(cfg.describe())})
    return Trained(backbone, head_model, diff, tr,
                   f"{cfg.kind} head, frozen backbone" + (f", {augment} augmented views" if augment else ""))


def _torch_backbone(bmeta, weights):
    from edgetl import backbones
    from edgetl.train.finetune import check_weights

    bb = backbones.get(bmeta[C.KEY_BACKBONE], weights)
    check_weights(bb, bmeta)
    return bb


@dataclasses.dataclass
class Cut:
    backbone: object  # backbones.Backbone
    stages: object  # finetune.Stages
    block: int  # index of the first trained block
    unfreeze: int
    trunk: object  # onnx.ModelProto: image → activation
    shape: list[int]
    path: Path  # the trunk's file in the cache folder
    meta: dict[str, str]


def _cut(n_unfreeze: int, bmeta, weights, cache_root, images: int, log) -> Cut:
    """Cut the PyTorch backbone before its last N blocks; export (and keep) the checked trunk."""
    from edgetl.train.finetune import cut_index, export_trunk, verified_stages

    bb = _torch_backbone(bmeta, weights)
    st = verified_stages(bb)
    k = cut_index(st, n_unfreeze, bb.name)
    trunk, shape = export_trunk(bb, st, k)
    tmeta = {p.key: p.value for p in trunk.metadata_props}
    path = Path(cache_root) / "trunks" / f"{tmeta[C.KEY_FINGERPRINT]}.onnx"
    if not path.exists():
        write_bytes(path, trunk.SerializeToString())
    per_image = int(np.prod(shape)) * 2  # float16
    log(f"cut {bb.name} before block {k} of {len(st.blocks)}: activation {shape}, "
        f"{per_image / 1e3:.0f} kB per image in the cache, at most {per_image * images / 1e6:.0f} MB in all")
    return Cut(bb, st, k, n_unfreeze, trunk, shape, path, tmeta)


def _train_top(cut: Cut, center, train_bn, ds, split, y_train, y_val, cfg, augment, cache_root, device,
               torch_device, batch_size, log, export: bool = True) -> Trained:
    import torch

    from edgetl.train import heads as head_mod
    from edgetl.train.finetune import device_batch, export_top, fit, tensor_batches, top_and_head

    bb, st, k, shape, tmeta, n_unfreeze = cut.backbone, cut.stages, cut.block, cut.shape, cut.meta, cut.unfreeze
    views = [center] + _aug_views(cut.path, ds, split, augment, cache_root, device, batch_size, log, True)
    x_train = np.concatenate([_rows(v, split.train) for v in views]).reshape(-1, *shape).astype(np.float16)
    y_all = np.concatenate([y_train] * len(views))
    x_val = _rows(center, split.val).reshape(-1, *shape)
    torch.manual_seed(cfg.seed)
    h = head_mod.build(cfg, bb.dim, len(ds.classes))
    top = top_and_head(st, k, h)
    for p in top.parameters():
        p.requires_grad_(True)
    dev = torch_device or ("cuda" if torch.cuda.is_available() else "cpu")
    top.to(dev)
    bs, lr = device_batch(dev, cfg.lr)
    params = [{"params": list(top.blocks.parameters()) + list(top.tail.parameters()), "lr": lr * 0.1},
              {"params": list(top.head.parameters()), "lr": lr}]
    box = [0]
    res = fit(top, tensor_batches(x_train, y_all, bs, True, cfg.seed, box, dev),
              tensor_batches(x_val, y_val, 2 * bs, False, 0, [0], dev), y_val, len(ds.classes), y_all, params, cfg,
              epochs=min(cfg.max_epochs, 30), patience=min(cfg.patience, 5), train_bn=train_bn, device=dev, log=log)
    if not export:  # --unfreeze auto's inner runs: the score is all that is needed
        return Trained(None, None, 0.0, res, "")
    extra = {C.KEY_BACKBONE: bb.name, C.KEY_FINGERPRINT: tmeta[C.KEY_FINGERPRINT], C.KEY_CUT: tmeta[C.KEY_CUT],
             C.KEY_HEAD: json.dumps({**cfg.describe(), "unfreeze": n_unfreeze, "train_bn": train_bn})}
    top_model, diff = export_top(res.model, shape, ds.classes, extra)
    return Trained(cut.trunk, top_model, diff, res, f"last {n_unfreeze} blocks + {cfg.kind} head on cached activations"
                   + (f", {augment} augmented views" if augment else ""))


def _train_all(bmeta, weights, train_bn, ds, split, y_train, y_val, cfg, augment, cache_root, device,
               torch_device, batch_size, log, export: bool = True, recipe=None) -> Trained:
    import torch

    from edgetl.data.preprocess import load_image
    from edgetl.export import fuse
    from edgetl.export.torch_onnx import image_module, to_onnx
    from edgetl.train import heads as head_mod
    from edgetl.train.finetune import DEFAULT_RECIPE, TrainImages, device_batch, fit, image_batches, llrd_groups

    bb = _torch_backbone(bmeta, weights)
    spec = bb.spec
    for p in bb.model.parameters():
        p.requires_grad_(True)
    torch.manual_seed(cfg.seed)
    h = head_mod.build(cfg, bb.dim, len(ds.classes))
    features = image_module(bb)

    class Full(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.features = features
            self.head = h

        def forward(self, image):
            return self.head(self.features(image))

    model = Full()
    dev = torch_device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(dev)
    recipe = recipe or DEFAULT_RECIPE
    images = TrainImages([ds.items[i].path for i in split.train], y_train, spec, bool(augment),
                         trivial_augment=recipe.trivial_augment)
    val_x = np.stack([load_image(ds.items[i].path, spec) for i in split.val]) if split.val else None
    rng = np.random.default_rng(cfg.seed)
    import time

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
        log(f"{line}, ETA {eta:.0f} s (at most)")

    params = (llrd_groups(model, model.features.features, model.head, lr, recipe.llrd) if recipe.llrd else
              [{"params": list(model.features.parameters()), "lr": lr * 0.1},
               {"params": list(model.head.parameters()), "lr": lr}])
    res = fit(model, train_batches, val_batches, y_val, len(ds.classes), y_train, params, cfg, epochs=epochs,
              patience=min(cfg.patience, 4), train_bn=train_bn, device=dev, log=progress, recipe=recipe,
              steps_per_epoch=-(-len(images) // bs))
    if not export:
        return Trained(None, None, 0.0, res, "")
    # Export the fine-tuned network as a new backbone (its own fingerprint) and the head, then fuse.
    from edgetl.backbones import state_sha256

    tuned = dataclasses.replace(bb, model=model.features.features)
    tuned.model.eval()
    tuned.weights_sha256 = state_sha256(tuned.model)
    h_, w_ = spec.input_size
    meta = {C.KEY_FORMAT: C.FORMAT_BACKBONE, C.KEY_VERSION: __version__, C.KEY_BACKBONE: f"{bb.name} (fine-tuned)",
            C.KEY_WEIGHTS_SHA256: tuned.weights_sha256, C.KEY_FINGERPRINT: tuned.fingerprint,
            C.KEY_EMBEDDING_DIM: str(bb.dim), C.KEY_PREPROCESS: spec.to_json()}
    first = to_onnx(image_module(tuned), (torch.zeros(2, h_, w_, 3, dtype=torch.uint8),), [C.IMAGE], [C.EMBEDDING], meta)
    head_model, diff = fuse.export_head(model.head, bb.dim, ds.classes, {
        C.KEY_BACKBONE: meta[C.KEY_BACKBONE], C.KEY_FINGERPRINT: tuned.fingerprint,
        C.KEY_HEAD: json.dumps({**cfg.describe(), "unfreeze": "all", "augment": bool(augment), "train_bn": train_bn,
                                "recipe": recipe.describe()})})
    return Trained(first, head_model, diff, res, "whole network fine-tuned" + (" with augmentation" if augment else "")
                   + ("" if recipe == DEFAULT_RECIPE else f" (recipe {recipe.describe()})"))


def _finish(t: Trained, fused, data, ds, split, y_val, cfg, out: Path, r, batch_size: int, reason: str,
            int8: bool = False, log=lambda s: None, search: dict | None = None) -> dict:
    """Verify fused vs chained on every validation image, compute the fused model's metrics, record the
    split in the model, and write the whole output set at once (a failure leaves the previous set)."""
    import onnx
    import onnxruntime
    import torch

    from edgetl.data.pipeline import image_batches
    from edgetl.data.preprocess import Spec
    from edgetl.data.split import record
    from edgetl.export import fuse
    from edgetl.export.torch_onnx import set_metadata, sha256_bytes
    from edgetl.quality import report

    fmeta = {p.key: p.value for p in fused.metadata_props}
    spec = Spec.from_json(fmeta[C.KEY_PREPROCESS])
    val_paths = [ds.items[i].path for i in split.val]
    bad: list = []

    def val_batches():
        for _, batch, errors in image_batches(val_paths, spec, batch_size):
            bad.extend(errors)  # cannot happen: these images were decoded moments ago
            if batch is not None:
                yield batch

    worst, n_checked, probs = fuse.check_fused(fused, t.first, t.second, val_batches())
    if bad:
        raise DataError(f"validation image became unreadable: {bad[0][1]}")
    if not probs:  # no validation images (tiny classes): check on training images instead
        _, batch, _ = next(image_batches([ds.items[i].path for i in split.train[:8]], spec, 8))
        worst, n_checked, _ = fuse.check_fused(fused, t.first, t.second, [batch])
    pred = np.concatenate(probs).argmax(1) if probs else np.zeros(0, int)
    m = report.metrics(y_val, pred, ds.classes)
    warnings = report.warnings(m)

    second_bytes = t.second.SerializeToString()
    cut = json.loads(fmeta[C.KEY_CUT]) if C.KEY_CUT in fmeta else None
    summary = {
        "name": out.resolve().name, "data": str(data), "split_note": split.note,
        "backbone": fmeta[C.KEY_BACKBONE], "regime": t.regime, "auto_reason": reason or None,
        "search": {k: v for k, v in search.items() if k != "cfg"} if search else None,
        "link": (f"activation maps {cut['shape']} after block {cut['block']}" if cut
                 else f"embeddings of size {fmeta.get(C.KEY_EMBEDDING_DIM)}"),
        "input_size": list(spec.input_size), "classes": ds.classes,
        "counts": {"train": _counts(ds, split.train), "val": _counts(ds, split.val)},
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
    quantized = _int8(fused, data, summary, log) if int8 else None

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
            write_text(tmp / "split.json", report.dumps(
                {"note": split.note, "train": [_rel(ds, i) for i in split.train], "val": [_rel(ds, i) for i in split.val]}))
        write_text(tmp / "metrics.json", report.dumps(summary))
        report.plot_confusion(m, tmp / "confusion.png")
        report.plot_curves(t.fit.history, t.fit.best_epoch, tmp / "curves.png")
        write_text(tmp / "MODEL_CARD.md", report.model_card(summary))
    summary["out"] = out
    return summary


def _int8(fused, data, summary: dict, log) -> bytes | None:
    """`--int8`: the int8 copy through the same gate as `edgetl quantize`; its outcome goes in the summary."""
    from edgetl.errors import GateRefused
    from edgetl.export.quantize import gate_line, quantize_model

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


def _counts(ds, idx) -> dict[str, int]:
    out = {c: 0 for c in ds.classes}
    for i in idx:
        out[ds.items[i].label] += 1
    return out


def _rel(ds, i) -> str:
    return os.path.relpath(ds.items[i].path, ds.root)


def default_out(data) -> Path:
    return Path("exports") / (Path(data).resolve().name or "model")
