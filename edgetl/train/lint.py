"""`edgetl lint`: what is wrong with a photo folder, found from its cached embeddings (the checks and
the report are described in `edgetl.quality.lint`, which holds every torch-free part). It lives with
training because its label-error check trains linear heads out of fold."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from edgetl import contract as C
from edgetl.data.embed import embed_folder, open_backbone
from edgetl.data.encode import embed_batch
from edgetl.data.preprocess import decode_bgr, load_image, opencv
from edgetl.data.scan import scan
from edgetl.data.sources import read_regular
from edgetl.data.split import make_split
from edgetl.errors import DataError, ImageError, ModelError
from edgetl.quality import lint as Q
from edgetl.quality.html import lint_page, write_page
from edgetl.train.heads import HeadConfig, train


def lint(data, backbone, cache_root, fail_on=Q.DEFAULT_FAIL_ON, val_fraction: float = 0.2, seed: int = 0,
         device: str = "auto", log=lambda line: None) -> dict:
    """Check the photo folder `data` (embedded with `backbone` into the cache at `cache_root`); returns
    the report (strict JSON). DataError for a folder without images, ModelError for a file that is
    not an edgetl backbone, CacheError for a cache that belongs to another backbone."""
    t0 = time.perf_counter()
    ds = scan(data, exclude=[cache_root])
    sess, spec, meta = open_backbone(backbone, device)
    if meta.get(C.KEY_FORMAT) != C.FORMAT_BACKBONE:
        raise ModelError(f"{backbone} is a {meta.get(C.KEY_FORMAT)}, not a backbone; lint needs embeddings "
                         "(give an exported backbone, e.g. exports/backbones/efficientnet_lite0.onnx)")
    r = embed_folder(ds, backbone, cache_root, device=device)
    log(f"embedded: {r.summary()}")
    root = ds.root
    rel = [Q.rel(it.path, root) for it in ds.items]
    usable = [i for i, k in enumerate(r.keys) if k is not None]
    notes = list(ds.notes) + list(r.namespace.problems)
    report = {"data": str(root), "backbone": meta.get(C.KEY_BACKBONE, "?"), "cache": str(r.namespace.dir),
              "images": len(ds.items), "readable": len(usable), "layout": ds.layout,
              "classes": ds.counts() if ds.classes else {}, "split": None, "fail_on": list(fail_on),
              "settings": {}, "counts": {}, "failed": [], "duplicates": [], "label_errors": [], "outliers": [],
              "imbalance": None, "small_images": [], "notes": notes,
              "unreadable": [{"path": Q.rel(p, root), "reason": reason} for p, reason in r.skipped]}
    if not usable:
        raise DataError(f"no readable images in {root} ({len(r.skipped)} unreadable, e.g. {r.skipped[0][1]})")
    keys = [r.keys[i] for i in usable]
    x = r.namespace.load(keys)[1]
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    labels = [ds.items[i].label for i in usable]
    sides = _sides(ds, r.keys, usable, val_fraction, seed, report)
    # near-duplicate threshold, measured on copies of the folder's own photos
    thr, how = near_threshold(sess, spec, [ds.items[i].path for i in usable], x, keys, seed)
    report["settings"].update(near_duplicate_cosine=round(thr, 4), near_duplicate_how=how)
    k_vote = Q.vote_k(labels)
    neighbours, sims, edges = Q.neighbours(x, keys, thr, max(k_vote, Q.OUTLIER_NEIGHBOURS) + 10)
    group = Q.components(keys, edges)
    report["duplicates"] = Q.groups(group, keys, edges, [rel[i] for i in usable], labels, sides)
    nb, nb_sim = Q.drop_own_group(neighbours, sims, group)
    report["outliers"] = Q.outliers(nb_sim, [rel[i] for i in usable], labels, report)
    if ds.classes and len(ds.classes) >= 2:
        report["label_errors"] = _label_errors(x, labels, [rel[i] for i in usable], ds.classes, group, nb, k_vote, seed,
                                               report, log)
    else:
        notes.append("label errors not checked: " + ("the folder has one class" if ds.classes else
                                                     "the folder has no class folders"))
    report["imbalance"] = Q.imbalance(report["classes"])
    report["small_images"] = Q.small_images([ds.items[i].path for i in usable], [rel[i] for i in usable], labels, spec,
                                           report)
    report["counts"] = Q.counts(report)
    report["failed"] = [c for c in fail_on if report["counts"].get(c)]
    report["seconds"] = round(time.perf_counter() - t0, 2)
    return report


def _sides(ds, keys, usable, val_fraction, seed, report) -> list[str | None]:
    """The side of the split each usable photo would be on: train, val, test, or None (unlabelled)."""
    if ds.layout == "split":
        report["split"] = "the folder's own " + " ".join(f"{s}/" for s in ("train", "val", "test")
                                                          if any(it.split == s for it in ds.items))
        return [ds.items[i].split for i in usable]
    if not ds.classes:
        return [None] * len(usable)
    s = make_split(ds, keys, usable, val_fraction, seed)
    report["split"] = f"the split train-head would make: {s.note}"
    side = {i: "train" for i in s.train} | {i: "val" for i in s.val}
    return [side.get(i) for i in usable]


def _copy(bgr: np.ndarray, rng, min_side: int) -> bytes:
    """A near copy of a photo, as someone might have saved it again: slightly cropped, resized (never below
    what the backbone reads), brightened or darkened, maybe mirrored, re-encoded as JPEG."""
    cv2 = opencv()
    h, w = bgr.shape[:2]
    f = rng.uniform(0, 0.03, 4)
    out = bgr[int(h * f[0]):h - int(h * f[1]), int(w * f[2]):w - int(w * f[3])]
    lo = min(1.0, min_side / max(1, min(out.shape[:2])))
    s = rng.uniform(max(lo, 0.7), 1.0) if lo < 1 else 1.0
    if s < 1:
        out = cv2.resize(out, (max(1, round(out.shape[1] * s)), max(1, round(out.shape[0] * s))),
                         interpolation=cv2.INTER_AREA)
    out = np.clip(out.astype(np.float32) * rng.uniform(0.92, 1.08), 0, 255).astype(np.uint8)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    ok, data = cv2.imencode(".jpg", np.ascontiguousarray(out), [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(70, 96))])
    return data.tobytes()


def near_threshold(sess, spec, paths, x: np.ndarray, keys, seed: int = 0) -> tuple[float, str]:
    """(cosine threshold, how it was measured): the similarity that 95 % of near copies of the folder's
    own photos keep to their original (Q.CALIBRATION_COPIES photos, each copied once), but never below
    the similarity that only 1 in 1000 pairs of different photos of the folder reach (a backbone that
    does not tell photos apart must not make the whole folder one group of copies)."""
    rng = np.random.default_rng(seed)
    pick = sorted(rng.choice(len(paths), min(Q.CALIBRATION_COPIES, len(paths)), replace=False).tolist())
    arrays, rows = [], []
    for i in pick:
        try:
            bgr = decode_bgr(read_regular(paths[i]), spec.resize_size, str(paths[i]))
            arrays.append(load_image(_copy(bgr, rng, spec.resize_size), spec))
            rows.append(i)
        except ImageError:
            continue
    sims = []
    for a in range(0, len(arrays), 32):
        e = embed_batch(sess, spec, arrays[a:a + 32])
        e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
        sims += (e * x[rows[a:a + 32]]).sum(1).tolist()
    pairs = Q.pair_similarities(x, keys, rng)
    floor = float(np.quantile(pairs, 1 - Q.PAIR_SHARE)) if len(pairs) else -1.0
    if not sims:
        thr, how = max(0.99, floor), "no photo could be copied to measure it: 0.99"
    else:
        thr = float(np.quantile(sims, Q.COPY_QUANTILE))
        how = (f"{1 - Q.COPY_QUANTILE:.0%} of {len(sims)} near copies of the folder's own photos (re-encoded, cropped "
               f"≤ 3 %, resized, brightness ±8 %, half mirrored) stay at or above it (median {np.median(sims):.3f})")
    if floor > thr:
        how += (f"; raised to {floor:.3f}, which only {Q.PAIR_SHARE:.1%} of pairs of different photos reach: this "
                "backbone tells copies from different photos poorly")
        thr = floor
    return thr, how


def out_of_fold(x: np.ndarray, y: np.ndarray, n_classes: int, fold: np.ndarray, seed: int = 0) -> np.ndarray:
    """Probabilities of each photo from a linear head trained on the other Q.folds (`edgetl.train.heads`)."""
    import torch

    cfg = HeadConfig(kind="linear", label_smoothing=0.0, seed=seed)
    p = np.zeros((len(y), n_classes), dtype=np.float64)
    empty_x, empty_y = x[:0], y[:0]
    for f in np.unique(fold):
        test = fold == f
        fit = train(x[~test], y[~test], empty_x, empty_y, n_classes, cfg, device="cpu")
        with torch.no_grad():
            p[test] = torch.softmax(fit.model(torch.as_tensor(x[test])), 1).numpy()
    return p


def _label_errors(x, labels, paths, classes, group, nb, k_vote, seed, report, log) -> list[dict]:
    y = np.array([classes.index(lab) for lab in labels])
    per_class = [len({int(g) for g in group[y == c]}) for c in range(len(classes))]
    k = min(Q.FOLDS, min(per_class))
    if k < 2:
        c = classes[int(np.argmin(per_class))]
        report["notes"].append(f"label errors not checked: class {c!r} has fewer than 2 distinct photos")
        return []
    fold = Q.folds(y, group, k, seed)
    p_head = out_of_fold(x, y, len(classes), fold, seed)
    votes = np.zeros_like(p_head)
    for i in range(len(y)):
        mine = nb[i][nb[i] >= 0][:k_vote]
        if len(mine):
            votes[i] = np.bincount(y[mine], minlength=len(classes)) / len(mine)
        else:
            votes[i] = p_head[i]
    p = 0.5 * p_head + 0.5 * votes
    flags, best, t = Q.confident_errors(p, y)
    agree = float((p_head.argmax(1) == y).mean())
    report["settings"].update(folds=k, neighbours=k_vote,
                              label_thresholds={c: round(float(v), 4) for c, v in zip(classes, t)},
                              out_of_fold_accuracy=round(agree, 4),
                              label_error_how=(f"confident learning on the mean of a linear head's {k}-fold out-of-fold "
                                               f"probabilities and a {k_vote}-nearest-neighbour label vote; the "
                                               f"out-of-fold head agrees with {agree:.1%} of the labels"))
    log(f"label errors: {k}-fold linear heads, out-of-fold agreement with the labels {agree:.1%}")
    idx = np.flatnonzero(flags)
    idx = idx[np.argsort(p[idx, y[idx]])]
    return [{"path": paths[i], "label": labels[i], "suggested": classes[int(best[i])],
             "p_label": round(float(p[i, y[i]]), 4), "p_suggested": round(float(p[i, best[i]]), 4)} for i in idx]


def write_html(report: dict, path: str | os.PathLike) -> Path:
    write_page(path, lint_page(report))
    return Path(path)
