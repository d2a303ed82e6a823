"""Metrics, confusion matrix, plots and the model card. Metrics need only numpy (no torch)."""

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
        smallest = min((v["support"], c) for c, v in m["per_class"].items())
        out.append(f"small validation set ({m['n']} photos; {smallest[0]} of {smallest[1]!r}): "
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


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(m: dict, path) -> bool:
    """The confusion matrix as a PNG; False (nothing written) when there is none or it is too large to read."""
    if m.get("confusion_matrix") is None or len(m["classes"]) > 50 or not m["n"]:
        return False
    plt = _plt()
    cm = np.asarray(m["confusion_matrix"])
    k = len(m["classes"])
    fig, ax = plt.subplots(figsize=(2 + 0.5 * k, 1.5 + 0.5 * k))
    ax.imshow(cm, cmap="Blues")
    names = [safe(c) for c in m["classes"]]
    ax.set_xticks(range(k), names, rotation=90 if k > 4 else 0)
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 20:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, cm[i, j], ha="center", va="center",
                        color="white" if cm[i, j] > cm.max() / 2 else "black", fontsize=8)
    ax.set_title(f"validation accuracy {m['accuracy']:.3f}, balanced {m['balanced_accuracy']:.3f}")
    fig.tight_layout()
    _save(fig, path)
    return True


def plot_curves(history: dict, best_epoch: int, path) -> None:
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    ep = range(1, len(history["train_loss"]) + 1)
    a.plot(ep, history["train_loss"], label="train loss")
    if history.get("val_loss"):
        a.plot(ep[:len(history["val_loss"])], history["val_loss"], label="validation loss (class-balanced)")
        b.plot(ep[:len(history["val_acc"])], history["val_acc"], label="validation accuracy", color="C2")
    if history.get("val_balanced_acc"):
        b.plot(ep[:len(history["val_balanced_acc"])], history["val_balanced_acc"], label="balanced accuracy", color="C3")
    if not history.get("val_loss"):
        b.text(0.5, 0.5, "no validation photos", ha="center", va="center", transform=b.transAxes)
    for ax in (a, b):
        ax.axvline(best_epoch, color="grey", ls="--", lw=1, label=f"kept epoch {best_epoch}")
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path) -> None:
    import io

    from edgetl.files import write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    _plt().close(fig)
    write_bytes(path, buf.getvalue())


def _cell(text: str) -> str:
    """A name inside a markdown table cell: control characters escaped, pipes escaped."""
    return safe(text).replace("|", "\\|")


def _search_section(s: dict) -> str:
    sr = s.get("search")
    if not sr or not sr.get("rows"):
        return ""
    from edgetl.train.search import Row, table

    lines = table([Row(**r) for r in sr["rows"]])
    inner = sr.get("inner", {})
    return (f"## How the regime was chosen (--unfreeze auto)\nThe {inner.get('photos')} training photos were split "
            f"into {inner.get('folds')} folds by content; each candidate was trained on all folds but one and scored on "
            f"that one (never on the validation photos above), for as many folds as a budget of "
            f"{sr['budget_s'] / 60:.0f} minutes allowed; chosen: {sr['chosen']} ({s['auto_reason']}).\n\n"
            + "    " + "\n    ".join(lines) + "\n\n")


def _int8_section(s: dict) -> str:
    q = s.get("int8")
    if not q:
        return ""
    if q["written"]:
        return f"## int8 copy\n`model.int8.onnx`: {q['line']}.\n\n"
    return f"## int8 copy\nNot written: {safe(q['reason'])}\n\n"


def model_card(s: dict) -> str:
    """A short markdown card from the training summary."""
    m = s["metrics"]

    def num(v):
        return f"{v:.3f}" if v is not None else "–"

    rows = "\n".join(f"| {_cell(c)} | {s['counts']['train'].get(c, 0)} | {s['counts']['val'].get(c, 0)} | "
                     f"{num(m['per_class'][c]['precision'])} | {num(m['per_class'][c]['recall'])} | "
                     f"{num(m['per_class'][c]['f1'])} |" for c in m["classes"][:200])
    if len(m["classes"]) > 200:
        rows += f"\n| … {len(m['classes']) - 200} more classes (metrics.json has them all) | | | | | |"
    hp = "\n".join(f"- {k}: {v}" for k, v in s["head"].items())
    auto = f" (chosen by --unfreeze auto: {s['auto_reason']})" if s.get("auto_reason") else ""
    if m["n"]:
        lo, hi = m["accuracy_ci95"]
        score = (f"Validation accuracy **{m['accuracy']:.4f}** ({m['correct']}/{m['n']}, 95% interval {lo:.2f}–{hi:.2f}), "
                 f"balanced accuracy **{m['balanced_accuracy']:.4f}**; always answering the largest class would "
                 f"score {m['majority_accuracy']:.4f}. Measured on the fused model, on photos it was not trained on.")
    else:
        score = "No validation photos: the accuracy was not measured."
    cautions = "\n".join(f"- {safe(w)}" for w in s.get("warnings", []) + s.get("notes", [])) or "- none"
    names = ", ".join(safe(c) for c in m["classes"][:50]) + (" …" if len(m["classes"]) > 50 else "")
    return f"""# {safe(s['name'])} — edgetl model card

Image classifier for {len(m['classes'])} classes: {names}.
One file, `model.onnx`: input `uint8 image[N,{s['input_size'][0]},{s['input_size'][1]},3]` (RGB, resized and
centre-cropped by `edgetl.data.preprocess.load_image`), output `float32 probabilities[N,{len(m['classes'])}]`.

## Data
{safe(s['data'])} ({s['split_note']})

| class | train | val | precision | recall | F1 |
| --- | ---: | ---: | ---: | ---: | ---: |
{rows}

{score}

## Cautions
{cautions}

## Model
- backbone: {s['backbone']} (ImageNet-pretrained); the head sees {s['link']}
- regime: {s['regime']}{auto}
- head: {s['head']['kind']}; kept epoch {s['best_epoch']} of {s['epochs_run']};
  trained in {s['train_seconds']:.1f} s on {s['device']}
- class balance: {s['class_weights'] if isinstance(s['class_weights'], str) else 'each class weighs the same in the loss'}

## Hyper-parameters
{hp}

{_search_section(s)}{_int8_section(s)}## Verification
Fused model vs backbone-then-head on {s['parity_images']} images: max abs diff {s['fuse_max_abs_diff']:.1e}
(tolerance {s['fuse_atol']:.0e}); head vs PyTorch: {s['head_max_abs_diff']:.1e}.

## Hashes and versions
- model.onnx sha256: {s['model_sha256']}
- backbone sha256: {s['backbone_sha256']}, weights sha256: {s['weights_sha256']}
- head sha256: {s['head_sha256']}
- edgetl {s['edgetl']}, torch {s['torch']}, onnx {s['onnx']}, onnxruntime {s['onnxruntime']}

## Run it
    edgetl evaluate model.onnx DATA      # scores only the validation photos recorded in the model
    edgetl predict model.onnx photo.jpg
    edgetl run --model model.onnx --camera 0

Needs only onnxruntime, numpy and OpenCV (`edgetl.deploy`).
"""


def json_line(obj) -> str:
    """One JSON line that stays valid UTF-8 whatever the file names (undecodable bytes become \\u escapes)."""
    line = json.dumps(obj, ensure_ascii=False, allow_nan=False)
    try:
        line.encode("utf-8")
        return line
    except UnicodeEncodeError:  # surrogate escapes from a non-UTF-8 file name
        return json.dumps(obj, ensure_ascii=True, allow_nan=False)


def dumps(obj) -> str:
    """Strict JSON (NaN/Infinity refused: they are not JSON)."""
    return json.dumps(obj, indent=1, ensure_ascii=False, allow_nan=False)
