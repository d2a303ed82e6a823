"""`edgetl lint`: what is wrong with a photo folder, found from its cached embeddings.

* unreadable files (what `embed` skipped);
* exact duplicates (same content key: SHA-256 of the bytes) and near duplicates (cosine similarity of
  embeddings at or above a threshold measured on the folder itself: the similarity that 95 % of
  re-encoded, slightly resized, cropped, brightened or mirrored copies of its own photos keep);
  a group of copies is *leakage* when it straddles the train/validation split that `train-head`
  would use (the folder's own train/ val/ test/, else `data.split.make_split`), and a *conflict*
  when it carries two labels;
* likely label errors: "confident learning" (Northcutt et al., as in cleanlab) on out-of-sample
  probabilities, each the average of a linear head's K-fold out-of-fold prediction (copies and
  near copies always in the same fold) and the labels of the photo's nearest neighbours in
  embedding space (its own copies excluded); a photo is flagged when another class reaches that
  class's threshold (THRESHOLD_SCALE times the mean probability its own photos get), beats every
  class that does, its own included, and is more likely than not;
* outliers: photos whose nearest neighbours (copies excluded) are far less similar than usual;
* class imbalance: the largest class at least IMBALANCE_RATIO times the smallest;
* tiny images (shorter side below the backbone's input size, read from the header) and upscaled
  ones: among photos not yet twice the input size, those with almost no detail at full resolution
  (the energy lost by halving the resolution, relative to the next octave, below UPSCALED_RATIO;
  a photo enlarged 2x or more from a smaller one scores well below, a sharp one well above).

The report is a dict that is strict JSON. Training the out-of-fold heads needs torch.
"""

from __future__ import annotations

import difflib
import json
import os
import warnings

import numpy as np

from edgetl.data.pipeline import prefetch_map
from edgetl.data.preprocess import header_size, opencv
from edgetl.data.sources import read_regular
from edgetl.data.split import class_groups, deal
from edgetl.errors import DataError, ImageError
from edgetl.quality.metrics import IMBALANCE_RATIO, safe

CATEGORIES = ("leakage", "conflict", "label-error", "duplicate", "near-duplicate", "outlier", "imbalance", "tiny",
              "upscaled", "unreadable")
DESCRIBE = {
    "unreadable": "files that cannot be decoded",
    "duplicate": "byte-identical copies (one class, one side of the split)",
    "near-duplicate": "different files of (nearly) the same picture",
    "leakage": "copies or near copies on both sides of the train/validation split",
    "conflict": "copies or near copies filed under different classes",
    "label-error": "photos whose label the out-of-sample predictions confidently disagree with",
    "outlier": "photos unlike any other in the folder",
    "imbalance": "largest class several times the smallest",
    "tiny": "shorter side below the backbone's input size",
    "upscaled": "little detail at full resolution: an enlarged smaller image",
}
DEFAULT_FAIL_ON = ("leakage", "conflict")
FOLDS = 5
NEIGHBOURS = 20  # k of the neighbour vote for label errors (fewer when a class is smaller)
# A class is "confident" for a photo at this share of its threshold (cleanlab's: the mean probability of the
# class over its own photos). On hymenoptera with 5 % of the training labels flipped (12 seeds,
# scripts/bench_lint.py), 0.9 found 85 % of the flips at 76 % precision (worst seed: 75 % and 69 %); 1.0 found
# 76 % at 93 %.
THRESHOLD_SCALE = 0.9
MIN_CONFIDENCE = 0.5  # ... and the class it looks like must be more likely than not (many classes, few photos)
OUTLIER_NEIGHBOURS = 5
OUTLIER_MADS = 4.0  # an outlier's neighbour similarity is this many (scaled) MADs below the median
UPSCALED_RATIO = 0.2
CALIBRATION_COPIES = 64  # photos copied (perturbed) to measure the near-duplicate threshold
COPY_QUANTILE = 0.05  # the threshold keeps 95 % of those copies


def parse_fail_on(text: str) -> tuple[str, ...]:
    """'leakage,conflict' → ('leakage', 'conflict'); 'none' or '' → (); DataError naming an unknown one."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if names in ([], ["none"]):
        return ()
    if names == ["all"]:
        return CATEGORIES
    bad = [n for n in names if n not in CATEGORIES]
    if bad:
        close = difflib.get_close_matches(bad[0], CATEGORIES, 1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise DataError(f"unknown check {bad[0]!r}{hint}; use a comma list of {', '.join(CATEGORIES)}, all or none")
    return tuple(dict.fromkeys(names))


def rel(path, root) -> str:
    try:
        return os.fsdecode(os.path.relpath(path, root))
    except ValueError:
        return os.fsdecode(path)


# --- near duplicates -------------------------------------------------------------------------------


PAIR_SHARE = 0.001


def pair_similarities(x: np.ndarray, keys, rng, most: int = 200_000) -> np.ndarray:
    """Cosine similarities of pairs of different photos (all pairs, or `most` drawn at random)."""
    n = len(x)
    if n * (n - 1) // 2 <= most:
        i, j = np.triu_indices(n, 1)
    else:
        i, j = rng.integers(0, n, most), rng.integers(0, n, most)
    key_id = key_ids(keys)
    keep = key_id[i] != key_id[j]
    i, j = i[keep], j[keep]
    out = np.empty(len(i), dtype=np.float32)
    for a in range(0, len(i), 1 << 18):
        out[a:a + (1 << 18)] = np.einsum("nd,nd->n", x[i[a:a + (1 << 18)]], x[j[a:a + (1 << 18)]])
    return out


def neighbours(x: np.ndarray, keys: list[bytes], thr: float, k: int):
    """Each photo's k most similar others (indices, similarities; exact copies excluded) and the near
    pairs (i < j, similarity ≥ thr, different content)."""
    n = len(x)
    k = max(0, min(k, n - 1))
    key_id = key_ids(keys)
    nb = np.zeros((n, k), dtype=np.int64)
    nb_sim = np.zeros((n, k), dtype=np.float32)
    edges = []
    rows = max(1, (1 << 23) // max(n, 1))  # 8M similarities at a time (32 MB, and 64 MB of indices)
    for a in range(0, n, rows):
        b = min(n, a + rows)
        s = x[a:b] @ x.T
        same = key_id[a:b, None] == key_id[None, :]
        s[same] = -np.inf  # itself and its exact copies
        ii, jj = np.nonzero(s >= thr)
        for i, j in zip((ii + a).tolist(), jj.tolist()):
            if i < j:
                edges.append((i, j, float(s[i - a, j])))
        if k:
            part = np.argpartition(-s, k - 1, axis=1)[:, :k]
            ps = np.take_along_axis(s, part, 1)
            order = np.argsort(-ps, axis=1)
            nb[a:b] = np.take_along_axis(part, order, 1)
            nb_sim[a:b] = np.take_along_axis(ps, order, 1)
    return nb, nb_sim, edges


def key_ids(keys) -> np.ndarray:
    """A small integer per distinct content key."""
    ids: dict[bytes, int] = {}
    return np.array([ids.setdefault(k, len(ids)) for k in keys], dtype=np.int64)


def components(keys, edges) -> np.ndarray:
    """Group id per photo: exact copies and near pairs joined (union-find)."""
    n = len(keys)
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[bytes, int] = {}
    for i, kb in enumerate(keys):
        if kb in first:
            parent[find(i)] = find(first[kb])
        else:
            first[kb] = i
    for i, j, _ in edges:
        parent[find(i)] = find(j)
    return np.array([find(i) for i in range(n)])


def groups(group, keys, edges, paths, labels, sides) -> list[dict]:
    """Groups of copies, the loud ones (leakage, conflict) first."""
    members: dict[int, list[int]] = {}
    for i, g in enumerate(group.tolist()):
        members.setdefault(g, []).append(i)
    weakest: dict[int, float] = {}
    for i, _, s in edges:
        g = int(group[i])
        weakest[g] = min(weakest.get(g, 1.0), s)
    out = []
    for g, idx in members.items():
        if len(idx) < 2:
            continue
        exact = len({keys[i] for i in idx}) == 1
        side_set = {sides[i] for i in idx if sides[i]}
        out.append({
            "kind": "exact" if exact else "near", "similarity": 1.0 if exact else round(weakest.get(g, 1.0), 4),
            "leakage": "train" in side_set and len(side_set) > 1,
            "conflict": len({labels[i] for i in idx if labels[i] is not None}) > 1,
            "items": [{"path": paths[i], "label": labels[i], "split": sides[i]} for i in idx],
        })
    out.sort(key=lambda d: (not (d["leakage"] or d["conflict"]), d["kind"] != "exact", -d["similarity"]))
    return out


def drop_own_group(nb, nb_sim, group):
    """Neighbour lists without the photo's own copies and near copies (rows padded with -1 / nan)."""
    keep = group[nb] != group[:, None]
    out_nb = np.full_like(nb, -1)
    out_sim = np.full(nb_sim.shape, np.nan, dtype=np.float32)
    for i in range(len(nb)):
        k = keep[i]
        out_nb[i, :k.sum()] = nb[i][k]
        out_sim[i, :k.sum()] = nb_sim[i][k]
    return out_nb, out_sim


# --- outliers --------------------------------------------------------------------------------------

def outliers(nb_sim, paths, labels, report) -> list[dict]:
    """Photos whose OUTLIER_NEIGHBOURS nearest others are far less similar than the folder's usual."""
    if nb_sim.shape[1] == 0 or len(paths) < 8:
        report["notes"].append("outliers not checked: fewer than 8 photos")
        return []
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a photo whose every neighbour is a copy: no score
        score = np.nanmean(nb_sim[:, :OUTLIER_NEIGHBOURS], axis=1)
    ok = ~np.isnan(score)
    if ok.sum() < 8:
        report["notes"].append("outliers not checked: fewer than 8 photos with neighbours other than their copies")
        return []
    med = float(np.median(score[ok]))
    mad = float(np.median(np.abs(score[ok] - med))) * 1.4826
    cut = med - OUTLIER_MADS * mad
    report["settings"].update(outlier_below=round(cut, 4), outlier_how=(
        f"mean cosine similarity to the {OUTLIER_NEIGHBOURS} nearest other photos below the median ({med:.3f}) "
        f"minus {OUTLIER_MADS:g} scaled MADs"))
    flagged = np.flatnonzero(ok & (score < cut))
    return [{"path": paths[i], "label": labels[i], "score": round(float(score[i]), 4)}
            for i in flagged[np.argsort(score[flagged])]]


# --- label errors ----------------------------------------------------------------------------------

def vote_k(labels) -> int:
    counts: dict = {}
    for lab in labels:
        counts[lab] = counts.get(lab, 0) + 1
    smallest = min(counts.values()) if counts else 1
    return int(np.clip(smallest - 1, 1, NEIGHBOURS))


def folds(y: np.ndarray, group: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold per photo: whole groups of copies, dealt out class by class (stratified)."""
    by_class = class_groups(range(len(y)), group.__getitem__, lambda i: int(y[i]), sorted({int(v) for v in y}))
    fold = np.zeros(len(y), dtype=np.int64)
    for f, members in enumerate(deal(by_class, k, np.random.default_rng(seed).shuffle, sorted(by_class))):
        fold[members] = f
    return fold


def confident_errors(p: np.ndarray, y: np.ndarray, scale: float = THRESHOLD_SCALE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Confident learning: per-class thresholds t_c (`scale` times the mean probability of class c over
    the photos labelled c); photo i is flagged when some class reaches its threshold and the best such
    class is not its label and has a probability of at least MIN_CONFIDENCE. Returns (flags, suggested
    class per photo, thresholds)."""
    n_classes = p.shape[1]
    t = scale * np.array([p[y == c, c].mean() if (y == c).any() else 1.0 for c in range(n_classes)])
    above = p >= t[None, :]
    best = np.where(above, p, -1.0).argmax(1)
    confident = np.take_along_axis(p, best[:, None], 1)[:, 0] >= MIN_CONFIDENCE
    return above.any(1) & (best != y) & confident, best, t


# --- classes and sizes -----------------------------------------------------------------------------

def imbalance(class_counts: dict) -> dict | None:
    present = {c: n for c, n in class_counts.items()}
    if len(present) < 2:
        return None
    big = max(present, key=present.get)
    small = min(present, key=present.get)
    ratio = present[big] / max(present[small], 1)
    return {"ratio": round(ratio, 3), "largest": [big, present[big]], "smallest": [small, present[small]],
            "flagged": bool(ratio >= IMBALANCE_RATIO), "limit": IMBALANCE_RATIO}


def header(path) -> tuple[int, int] | None:
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 18)
            size = header_size(head, str(path))
            if size is None and len(head) == 1 << 18:  # a header past large metadata; never a whole huge file
                size = header_size(head + f.read(1 << 24), str(path))
        return size
    except (OSError, ImageError):
        return None


def detail_ratio(grey: np.ndarray) -> float:
    """Energy lost by halving the resolution, relative to the energy lost by halving it again: about
    0.3–2 for photos at their native resolution, under 0.25 for photos enlarged 2x or more."""
    cv2 = opencv()

    def lost(g):
        h, w = g.shape
        small = cv2.resize(g, (max(1, w // 2), max(1, h // 2)), interpolation=cv2.INTER_AREA)
        return float(np.mean((g - cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)) ** 2)), small

    g = grey.astype(np.float32)
    fine, half = lost(g)
    coarse, _ = lost(half)
    return fine / max(coarse, 1e-6)


def upscaled(path) -> float | None:
    try:
        grey = opencv().imdecode(np.frombuffer(read_regular(path), np.uint8), opencv().IMREAD_GRAYSCALE)
    except (ImageError, opencv().error):
        return None
    if grey is None or min(grey.shape) < 16:
        return None
    return detail_ratio(grey)


def small_images(paths, rel, labels, spec, report) -> list[dict]:
    side = min(spec.input_size)
    report["settings"].update(tiny_below=side, upscaled_ratio=UPSCALED_RATIO, upscaled_how=(
        f"photos with a shorter side under {2 * side} (twice the input size) whose detail ratio (energy lost by "
        f"halving the resolution over that lost by halving it again) is below {UPSCALED_RATIO}"))
    out = []
    sizes = [s for _, s in prefetch_map(header, paths)]
    check = [i for i, s in enumerate(sizes) if s is not None and side <= min(s) < 2 * side and s[0] * s[1] <= 20e6]
    ratios = dict(zip(check, (v for _, v in prefetch_map(upscaled, [paths[i] for i in check]))))
    for i, s in enumerate(sizes):
        if s is None:
            continue
        w, h = s
        if min(w, h) < side:
            out.append({"path": rel[i], "label": labels[i], "kind": "tiny", "width": w, "height": h})
        elif ratios.get(i) is not None and ratios[i] < UPSCALED_RATIO:
            out.append({"path": rel[i], "label": labels[i], "kind": "upscaled", "width": w, "height": h,
                        "detail_ratio": round(ratios[i], 4)})
    return out


# --- report ----------------------------------------------------------------------------------------

def counts(report: dict) -> dict[str, int]:
    d = report["duplicates"]
    small = report["small_images"]
    return {
        "leakage": sum(g["leakage"] for g in d), "conflict": sum(g["conflict"] for g in d),
        "label-error": len(report["label_errors"]),
        "duplicate": sum(g["kind"] == "exact" and not (g["leakage"] or g["conflict"]) for g in d),
        "near-duplicate": sum(g["kind"] == "near" and not (g["leakage"] or g["conflict"]) for g in d),
        "outlier": len(report["outliers"]),
        "imbalance": int(bool(report["imbalance"] and report["imbalance"]["flagged"])),
        "tiny": sum(s["kind"] == "tiny" for s in small), "upscaled": sum(s["kind"] == "upscaled" for s in small),
        "unreadable": len(report["unreadable"]),
    }


def text(report: dict, first: int = 5) -> str:
    """The report for people: one line per check, then the first few of each finding."""
    c = report["counts"]
    lines = []
    for cat in CATEGORIES:
        mark = "FAIL" if cat in report["failed"] else ("found" if c[cat] else "ok")
        lines.append(f"{cat:<15} {c[cat]:>5}  {mark:<5}  {DESCRIBE[cat]}")
    loud = [g for g in report["duplicates"] if g["leakage"] or g["conflict"]]
    for g in loud[:first]:
        what = " and ".join(t for t in ("leakage", "conflict") if g[t])
        lines.append(f"  {what} ({g['kind']}, {g['similarity']:.3f}): "
                     + ", ".join(f"{safe(it['path'])} [{safe(it['label'] or '')}{'/' + it['split'] if it['split'] else ''}]"
                                 for it in g["items"][:4]) + (" …" if len(g["items"]) > 4 else ""))
    for e in report["label_errors"][:first]:
        lines.append(f"  label-error: {safe(e['path'])} labelled {safe(e['label'])!r} ({e['p_label']:.2f}), looks like "
                     f"{safe(e['suggested'])!r} ({e['p_suggested']:.2f})")
    for o in report["outliers"][:first]:
        lines.append(f"  outlier: {safe(o['path'])} (similarity to nearest {o['score']:.2f})")
    for s in report["small_images"][:first]:
        lines.append(f"  {s['kind']}: {safe(s['path'])} ({s['width']}x{s['height']})")
    for u in report["unreadable"][:first]:
        lines.append(f"  unreadable: {safe(u['reason'])}")
    imb = report["imbalance"]
    if imb and imb["flagged"]:
        lines.append(f"  imbalance: {safe(imb['largest'][0])} has {imb['largest'][1]} photos, "
                     f"{safe(imb['smallest'][0])} {imb['smallest'][1]} ({imb['ratio']:.1f}x)")
    for n in report["notes"]:
        lines.append(f"note: {safe(n)}")
    return "\n".join(lines)


def summary(report: dict) -> str:
    found = [f"{n} {cat}" for cat, n in report["counts"].items() if n]
    return (f"linted {report['readable']} of {report['images']} images in {report['seconds']:.1f} s: "
            + (", ".join(found) if found else "nothing found"))


def to_json(report: dict) -> str:
    """Strict JSON, valid UTF-8 whatever the file names."""
    try:
        out = json.dumps(report, indent=1, ensure_ascii=False, allow_nan=False)
        out.encode("utf-8")
        return out
    except UnicodeEncodeError:
        return json.dumps(report, indent=1, ensure_ascii=True, allow_nan=False)


