"""Metrics of a classifier on labelled photos: accuracy beside balanced accuracy, per-class figures, the
confusion matrix, an interval, and the warnings that go with them; strict JSON. Needs only numpy."""

from __future__ import annotations

import json

import numpy as np

from edgetl.data.split import SMALL_VAL_PER_CLASS

DENSE_CONFUSION_UP_TO = 100  # classes; above, only the largest confusions are kept (a k×k matrix would be huge)


def metrics(y_true, y_pred, classes: list[str]) -> dict:
    """Accuracy beside balanced accuracy (mean per-class recall), per-class precision/recall/F1/support,
    the confusion matrix (rows: true), the majority-class baseline and a 95 % Wilson interval.

    Strict JSON: a value that cannot be computed (no images) is None, never NaN.
    """
    y_true, y_pred = np.asarray(y_true, int), np.asarray(y_pred, int)
    k = len(classes)
    support = np.bincount(y_true, minlength=k)
    predicted = np.bincount(y_pred, minlength=k)
    correct_per = np.bincount(y_true[y_true == y_pred], minlength=k)
    per = {}
    for i, c in enumerate(classes):
        p = correct_per[i] / predicted[i] if predicted[i] else 0.0
        r = correct_per[i] / support[i] if support[i] else None
        f1 = 2 * p * r / (p + r) if r is not None and p + r else 0.0
        per[c] = {"precision": float(p), "recall": None if r is None else float(r), "f1": float(f1),
                  "support": int(support[i])}
    n, correct = int(len(y_true)), int(correct_per.sum())
    recalls = [v["recall"] for v in per.values() if v["recall"] is not None]
    out = {"accuracy": correct / n if n else None, "correct": correct, "n": n,
           "balanced_accuracy": float(np.mean(recalls)) if recalls else None,
           "majority_accuracy": float(support.max() / n) if n else None,
           "accuracy_ci95": list(wilson(correct, n)) if n else None,
           "small_val": bool(n == 0 or support[support > 0].min() < SMALL_VAL_PER_CLASS or (support == 0).any()),
           "per_class": per, "classes": classes}
    if k <= DENSE_CONFUSION_UP_TO:
        cm = np.zeros((k, k), dtype=int)
        np.add.at(cm, (y_true, y_pred), 1)
        out["confusion_matrix"] = cm.tolist()
    else:
        pairs: dict = {}
        for t, p in zip(y_true[y_true != y_pred].tolist(), y_pred[y_true != y_pred].tolist()):
            pairs[(t, p)] = pairs.get((t, p), 0) + 1
        top = sorted(pairs.items(), key=lambda kv: -kv[1])[:50]
        out["confusion_matrix"] = None
        out["top_confusions"] = [{"true": classes[t], "predicted": classes[p], "count": c} for (t, p), c in top]
    return out


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion (sensible for small n and for 0 or n successes)."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def headline(m: dict) -> str:
    """One line: accuracy (correct/n), balanced accuracy; or why there is no number."""
    if not m["n"]:
        return "no validation photos: accuracy not measured"
    return (f"accuracy {m['accuracy']:.4f} ({m['correct']}/{m['n']}), "
            f"balanced accuracy {m['balanced_accuracy']:.4f}")


def warnings(m: dict) -> list[str]:
    """One line each: a small validation set (with the interval), a model not clearly better than
    always answering the largest class, a class it (almost) never recognises."""
    out = []
    if not m["n"]:
        return out
    lo, hi = m["accuracy_ci95"]
    if m["small_val"]:
        small = sorted((v["support"], c) for c, v in m["per_class"].items() if v["support"] < SMALL_VAL_PER_CLASS)
        named = ", ".join(f"{n} of {safe(c)!r}" for n, c in small[:MAX_NAMED])
        more = f" and {len(small) - MAX_NAMED} more classes" if len(small) > MAX_NAMED else ""
        out.append(f"small validation set ({m['n']} photos; {named}{more}): "
                   f"accuracy 95% interval {lo:.2f}–{hi:.2f}; treat the number as rough")
    if lo <= m["majority_accuracy"] and m["majority_accuracy"] < 1:
        out.append(f"accuracy {m['accuracy']:.4f} is not clearly above always answering the largest class "
                   f"({m['majority_accuracy']:.4f}): look at the per-class recall before using this model")
    weak = [c for c, v in m["per_class"].items() if v["recall"] is not None and v["recall"] < NEAR_ZERO_RECALL]
    if weak:
        out.append(f"class {safe(weak[0])!r} is almost never recognised (recall "
                   f"{m['per_class'][weak[0]]['recall']:.2f})" + (f", nor {len(weak) - 1} more" if len(weak) > 1 else "")
                   + ": add photos of it or check its labels")
    return out


NEAR_ZERO_RECALL = 0.1
MAX_NAMED = 10  # classes named in one warning line
IMBALANCE_RATIO = 3.0  # the largest class at least this many times the smallest: imbalanced
BALANCING = {"weighted": "training weighted every class the same in the loss (--balance weighted)",
             "sampler": "training drew class-balanced batches (--balance sampler)",
             "none": "training did nothing about it (--balance none): expect the large classes to be favoured",
             "legacy": "training used class-weighted cross-entropy (legacy)"}


def imbalance_warnings(train_counts: dict, balance: str | None = None) -> list[str]:
    """One line when the training photos are imbalanced (largest class >= IMBALANCE_RATIO times the
    smallest): the ratio, the two classes, and what training did about it (`balance`, when known)."""
    have = {c: n for c, n in train_counts.items() if isinstance(n, int) and n > 0}
    if len(have) < 2:
        return []
    big, small = max(have, key=have.get), min(have, key=have.get)
    ratio = have[big] / have[small]
    if ratio < IMBALANCE_RATIO:
        return []
    did = BALANCING.get(balance or "", "training's balancing is not recorded")
    return [f"imbalanced training photos, {ratio:.1f}:1 ({have[big]} of {safe(big)!r} vs {have[small]} of "
            f"{safe(small)!r}); {did}; balanced accuracy is the number to watch"]


def safe(text: str) -> str:
    """A name as it may be printed: control characters escaped."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in str(text))


def text(m: dict) -> str:
    """Human table: accuracy, per-class metrics, confusion matrix."""
    classes = [safe(c) for c in m["classes"]]
    w = max(8, *(len(c) for c in classes)) + 1
    lines = [headline(m), "", f"{'class':<{w}} precision  recall      f1  support"]
    for c, raw in zip(classes, m["classes"]):
        r = m["per_class"][raw]
        rec = f"{r['recall']:>7.3f}" if r["recall"] is not None else f"{'-':>7}"
        lines.append(f"{c:<{w}} {r['precision']:>9.3f} {rec} {r['f1']:>7.3f} {r['support']:>8d}")
    if m.get("confusion_matrix") is not None:
        lines += ["", "confusion matrix (rows: true, columns: predicted)",
                  " " * w + " ".join(f"{c[:7]:>7}" for c in classes)]
        for c, row in zip(classes, m["confusion_matrix"]):
            lines.append(f"{c:<{w}}" + " ".join(f"{v:>7d}" for v in row))
    elif m.get("top_confusions"):
        lines += ["", "most frequent confusions (true → predicted: count)"]
        lines += [f"  {safe(x['true'])} → {safe(x['predicted'])}: {x['count']}" for x in m["top_confusions"][:20]]
    return "\n".join(lines)


def json_line(obj) -> str:
    """One JSON line that stays valid UTF-8 whatever the file names (undecodable bytes become \\u escapes)."""
    line = json.dumps(obj, ensure_ascii=False, allow_nan=False)
    try:
        line.encode("utf-8")
        return line
    except UnicodeEncodeError:  # surrogate escapes from a non-UTF-8 file name
        return json.dumps(obj, ensure_ascii=True, allow_nan=False)


def dumps(obj) -> str:
    """Strict JSON (NaN/Infinity refused: they are not JSON) that stays valid UTF-8 whatever the file names
    (a name with bytes that are not UTF-8 becomes \\u escapes, which json.loads turns back into the same path)."""
    text = json.dumps(obj, indent=1, ensure_ascii=False, allow_nan=False)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:  # surrogate escapes from a non-UTF-8 file name
        return json.dumps(obj, indent=1, ensure_ascii=True, allow_nan=False)
