"""Metrics, confusion matrix, plots and the model card. Metrics need only numpy (no torch)."""

from __future__ import annotations

import json

import numpy as np


def metrics(y_true, y_pred, classes: list[str]) -> dict:
    """Accuracy, per-class precision/recall/F1/support, and the confusion matrix (rows: true)."""
    y_true, y_pred = np.asarray(y_true, int), np.asarray(y_pred, int)
    k = len(classes)
    cm = np.zeros((k, k), dtype=int)
    np.add.at(cm, (y_true, y_pred), 1)
    per = {}
    for i, c in enumerate(classes):
        tp = cm[i, i]
        p = tp / cm[:, i].sum() if cm[:, i].sum() else 0.0
        r = tp / cm[i].sum() if cm[i].sum() else 0.0
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        per[c] = {"precision": float(p), "recall": float(r), "f1": float(f1), "support": int(cm[i].sum())}
    n = int(cm.sum())
    return {"accuracy": float(np.trace(cm) / n) if n else float("nan"), "correct": int(np.trace(cm)), "n": n,
            "per_class": per, "confusion_matrix": cm.tolist(), "classes": classes}


def text(m: dict) -> str:
    """Human table: accuracy, per-class metrics, confusion matrix."""
    classes = m["classes"]
    w = max(8, *(len(c) for c in classes)) + 1
    lines = [f"accuracy {m['accuracy']:.4f} ({m['correct']}/{m['n']})", "",
             f"{'class':<{w}} precision  recall      f1  support"]
    for c in classes:
        r = m["per_class"][c]
        lines.append(f"{c:<{w}} {r['precision']:>9.3f} {r['recall']:>7.3f} {r['f1']:>7.3f} {r['support']:>8d}")
    lines += ["", "confusion matrix (rows: true, columns: predicted)",
              " " * w + " ".join(f"{c[:7]:>7}" for c in classes)]
    for c, row in zip(classes, m["confusion_matrix"]):
        lines.append(f"{c:<{w}}" + " ".join(f"{v:>7d}" for v in row))
    return "\n".join(lines)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(m: dict, path) -> None:
    plt = _plt()
    cm = np.asarray(m["confusion_matrix"])
    k = len(m["classes"])
    fig, ax = plt.subplots(figsize=(2 + 0.5 * k, 1.5 + 0.5 * k))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(k), m["classes"], rotation=90 if k > 4 else 0)
    ax.set_yticks(range(k), m["classes"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 20:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, cm[i, j], ha="center", va="center",
                        color="white" if cm[i, j] > cm.max() / 2 else "black", fontsize=8)
    ax.set_title(f"validation accuracy {m['accuracy']:.3f}")
    fig.tight_layout()
    _save(fig, path)


def plot_curves(history: dict, best_epoch: int, path) -> None:
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    ep = range(1, len(history["train_loss"]) + 1)
    a.plot(ep, history["train_loss"], label="train loss")
    a.plot(ep, history["val_loss"], label="validation loss")
    b.plot(ep, history["val_acc"], label="validation accuracy", color="C2")
    for ax in (a, b):
        ax.axvline(best_epoch, color="grey", ls="--", lw=1, label=f"best epoch {best_epoch}")
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


def model_card(s: dict) -> str:
    """A short markdown card from the training summary."""
    m = s["metrics"]
    rows = "\n".join(f"| {c} | {s['counts']['train'].get(c, 0)} | {s['counts']['val'].get(c, 0)} | "
                     f"{m['per_class'][c]['precision']:.3f} | {m['per_class'][c]['recall']:.3f} | "
                     f"{m['per_class'][c]['f1']:.3f} |" for c in m["classes"])
    hp = "\n".join(f"- {k}: {v}" for k, v in s["head"].items())
    auto = f" (chosen by --unfreeze auto: {s['auto_reason']})" if s.get("auto_reason") else ""
    return f"""# {s['name']} — edgetl model card

Image classifier for {len(m['classes'])} classes: {', '.join(m['classes'])}.
One file, `model.onnx`: input `uint8 image[N,{s['input_size'][0]},{s['input_size'][1]},3]` (RGB, resized and
centre-cropped by `edgetl.data.preprocess.load_image`), output `float32 probabilities[N,{len(m['classes'])}]`.

## Data
{s['data']} ({s['split_note']})

| class | train | val | precision | recall | F1 |
| --- | ---: | ---: | ---: | ---: | ---: |
{rows}

Validation accuracy **{m['accuracy']:.4f}** ({m['correct']}/{m['n']}), measured on the fused model.

## Model
- backbone: {s['backbone']} (ImageNet-pretrained); the head sees {s['link']}
- regime: {s['regime']}{auto}
- head: {s['head']['kind']}; best epoch {s['best_epoch']} of {s['epochs_run']};
  trained in {s['train_seconds']:.1f} s on {s['device']}
- class weights: {s['class_weights']}

## Hyper-parameters
{hp}

## Verification
Fused model vs backbone-then-head on {s['parity_images']} validation images: max abs diff {s['fuse_max_abs_diff']:.1e}
(tolerance {s['fuse_atol']:.0e}); head vs PyTorch: {s['head_max_abs_diff']:.1e}.

## Hashes and versions
- model.onnx sha256: {s['model_sha256']}
- backbone sha256: {s['backbone_sha256']}, weights sha256: {s['weights_sha256']}
- head sha256: {s['head_sha256']}
- edgetl {s['edgetl']}, torch {s['torch']}, onnx {s['onnx']}, onnxruntime {s['onnxruntime']}

## Run it
    edgetl evaluate model.onnx DATA
    edgetl predict model.onnx photo.jpg
    edgetl run --model model.onnx --camera 0

Needs only onnxruntime, numpy and OpenCV (`edgetl.deploy`).
"""


def dumps(obj) -> str:
    return json.dumps(obj, indent=1, ensure_ascii=False)
