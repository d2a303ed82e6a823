"""`--unfreeze auto`: try the candidate regimes that fit the budget on inner folds of the training photos,
and choose one by the rules of `train/search.py` (never looking at the validation photos)."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time

import numpy as np

from edgetl import contract as C
from edgetl.data.embed import embed_folder
from edgetl.data.split import Split, folds, make_split
from edgetl.errors import DataError, EdgetlError
from edgetl.export.graph import load, metadata
from edgetl.export.stages import verified_stages
from edgetl.ort import session
from edgetl.train import search as S
from edgetl.train.cut import torch_backbone
from edgetl.train.depths import multi_backbone, train_multi
from edgetl.train.frozen import train_frozen
from edgetl.train.full import train_all
from edgetl.train.request import Job, TrainRequest, check_classes, counts, labels
from edgetl.train.top import cut_backbone, train_top

# Only when the training photos cannot be cut into folds (every class a single photo) does auto fall back on
# this rule of thumb: the smallest class's training count → regime.
AUTO_HEAD_BELOW = 200  # fewer per class: a head on frozen features (more layers would overfit)
AUTO_ALL_FROM = 1000  # this many or more per class: fine-tune everything; between: the last 2 blocks


@dataclasses.dataclass
class Choice:
    """What auto chose, and the table that shows why (the model card prints it)."""

    unfreeze: str
    augment: int
    cfg: object  # heads.HeadConfig
    chosen: str
    reason: str
    rows: list
    budget_s: float
    inner: dict | None = None
    features: str = "last"
    backbone: str | None = None  # the multi-depth backbone file, when the chosen candidate reads several depths

    def record(self) -> dict:
        """The JSON-ready record that goes in metrics.json."""
        d = dataclasses.asdict(self)
        d.pop("cfg")
        d.pop("backbone")
        if d["inner"] is None:
            d.pop("inner")
        return d


def choose_regime(per_class: int) -> tuple[str, str]:
    """(unfreeze, reason) for --unfreeze auto, from the smallest class's number of training images."""
    if per_class < AUTO_HEAD_BELOW:
        return "0", f"{per_class} training images in the smallest class (< {AUTO_HEAD_BELOW}): head only"
    if per_class < AUTO_ALL_FROM:
        return "2", f"{per_class} per class ({AUTO_HEAD_BELOW}–{AUTO_ALL_FROM - 1}): fine-tune the last 2 blocks"
    return "all", f"{per_class} per class (>= {AUTO_ALL_FROM}): fine-tune the whole network"


def search(req: TrainRequest, scanned, backbone, bmeta: dict, log) -> Choice:
    """Try the candidates that fit the budget on inner folds of the training photos; the chosen regime."""
    cfg, device = req.head, req.device
    t0 = time.perf_counter()
    budget = 60 * (req.budget_min if req.budget_min else S.default_budget_min(device))
    r = embed_folder(scanned, req.backbone, req.cache, device=device)
    ds = r.dataset
    usable = [i for i, k in enumerate(r.keys) if k is not None]
    check_classes(ds, usable)
    outer = make_split(ds, r.keys, usable, req.val_fraction, cfg.seed)
    inner = [Split(f.train, f.val, "inner fold of the training photos", False)
             for f in folds(ds, r.keys, outer.train, S.FOLDS, cfg.seed + 1)]
    inner = [f for f in inner if len(set(labels(ds, f.train))) == len(ds.classes)]
    if not inner:
        unfreeze, why = choose_regime(min(counts(ds, outer.train).values()))
        return Choice(unfreeze, 0, cfg, f"--unfreeze {unfreeze}", f"too few training photos to measure ({why})", [],
                      budget)
    sess = session(req.backbone, device, short_job=True)
    h, w = json.loads(bmeta[C.KEY_PREPROCESS])["input_size"]
    x = np.zeros((16, h, w, 3), np.uint8)
    sess.run(None, {C.IMAGE: x})
    t = time.perf_counter()
    sess.run(None, {C.IMAGE: x})
    embed_s = (time.perf_counter() - t) / 16 + 0.003  # + decoding
    log("--unfreeze auto: timing a few inference and training steps of each candidate here, to estimate its cost")
    t_probe = time.perf_counter()
    bb = torch_backbone(bmeta, req.weights)
    st = verified_stages(bb)
    pr = S.probe(bb, st, embed_s, device,
                 [int(c.unfreeze) for c in S.CANDIDATES if c.unfreeze.isdigit() and 0 < int(c.unfreeze) <= len(st.blocks)])
    n_images, n_fold_train, quiet = len(ds.items), len(inner[0].train), (lambda line: None)
    plan = sorted(S.CANDIDATES, key=lambda c: pr.cost(c, n_images, n_fold_train))
    rows = {c: S.Row(c.name, pr.cost(c, n_images, n_fold_train)) for c in plan}
    final = {c: pr.cost(c, n_images, len(outer.train)) for c in plan}  # its run on all training photos
    last = {}  # candidate → seconds of its latest fold (the estimate of its next)
    cuts = {}  # "N" → (Cut, its activation maps' embedding result)
    multi = {}  # "multi" → (path, proto, metadata, embedding result) of the multi-depth backbone
    needed = {}  # candidate over budget → the budget (s) that would have let its first fold run
    log(f"--unfreeze auto: estimated in {time.perf_counter() - t_probe:.0f} s; up to {len(inner)} folds of the "
        f"{len(outer.train)} training photos, budget {budget / 60:.0f} min")

    def run(c, k: int) -> bool:
        """Fold k of candidate c, when it fits the budget; False when it does not (or failed)."""
        row, fold = rows[c], inner[k]
        # a first fold keeps room for its own final run; a later one for the dearest final run that could win
        reserve = final[c] if not k else max(final[d] for d in plan if rows[d].status == "tried")
        want = time.perf_counter() - t0 + last.get(c, row.estimated_s) + reserve
        if want > budget:
            if not k:
                row.status = "over budget"
                needed[c] = want
            return False
        started = time.perf_counter()
        job = Job(ds, fold, labels(ds, fold.train), labels(ds, fold.val), dataclasses.replace(cfg, kind=c.kind),
                  c.augment, req.cache, device, req.torch_device, req.batch_size, quiet)
        try:
            if c.features == "multi":
                if not multi:  # every photo through the multi-depth backbone once; each fold reads the cache
                    path = multi_backbone(bmeta, req.weights, req.cache, quiet)
                    proto = load(path, C.FORMAT_BACKBONE)
                    multi["multi"] = path, proto, metadata(proto), embed_folder(ds, path, req.cache, device=device)
                path, proto, mmeta, rm = multi["multi"]
                fit = train_multi(job, rm, proto, mmeta, path, export=False, inner_folds=3).fit
            elif c.unfreeze == "0":
                fit = train_frozen(job, r, backbone, bmeta, req.backbone).fit
            elif c.unfreeze == "all":
                fit = train_all(job, bmeta, req.weights, req.train_bn, export=False, recipe=req.recipe).fit
            else:
                if c.unfreeze not in cuts:  # the trunk and its activation maps serve every fold
                    cut = cut_backbone(int(c.unfreeze), bmeta, req.weights, req.cache, n_images * (1 + S.AUG), quiet)
                    cuts[c.unfreeze] = cut, embed_folder(ds, cut.path, req.cache, device=device, check_space=True)
                cut, rt = cuts[c.unfreeze]
                fresh = dataclasses.replace(cut, stages=copy.deepcopy(cut.stages))  # each fold from pretrained weights
                fit = train_top(job, fresh, rt, req.train_bn, export=False).fit
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
    if needed:  # the cheapest candidate left out, and the budget that would have admitted it
        c = min(needed, key=needed.get)
        log(f"  {len(needed)} candidate{'s' if len(needed) > 1 else ''} over budget; the next, {c.name}, needs "
            f"--budget {math.ceil(needed[c] / 60)} (estimated)")
    top, why = S.choose(rows)
    if top is None:
        more = f" (the cheapest needs about --budget {math.ceil(min(needed.values()) / 60)})" if needed else ""
        raise DataError(f"no candidate regime fits a budget of {budget / 60:.1f} min{more}; give --budget more minutes")
    c = next(c for c in plan if rows[c] is top)
    for line in S.table(list(rows.values())):
        log(line)
    n_tried = sum(x.status == "tried" for x in rows.values())
    return Choice(c.unfreeze, c.augment, dataclasses.replace(cfg, kind=c.kind), c.name,
                  f"{why}: inner balanced accuracy {top.balanced_accuracy:.4f} over {top.folds} folds; {n_tried} "
                  f"candidates tried in {time.perf_counter() - t0:.0f} s of a {budget / 60:.0f} min budget",
                  [dataclasses.asdict(x) for x in rows.values()], budget,
                  {"photos": len(outer.train), "folds": len(inner)}, c.features,
                  str(multi["multi"][0]) if c.features == "multi" else None)
