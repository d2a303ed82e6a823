"""What train-head writes beside the model for people: the model card (markdown), the confusion matrix and
the training curves (PNG, matplotlib)."""

from __future__ import annotations

import io

import numpy as np

from edgetl.files import write_bytes
from edgetl.quality.metrics import safe
from edgetl.train.search import Row, table


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(m: dict, path) -> bool:
    """The confusion matrix as a PNG; False (nothing written) when there is none or it is too large to read."""
    if m.get("confusion_matrix") is None or len(m["classes"]) > 50 or not m["n"]:
        return False
    plt = pyplot()
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
    save_figure(fig, path)
    return True


def plot_curves(history: dict, best_epoch: int, path) -> None:
    plt = pyplot()
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
    save_figure(fig, path)


def save_figure(fig, path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    pyplot().close(fig)
    write_bytes(path, buf.getvalue())


def cell(text: str) -> str:
    """A name as markdown text (a table cell too): control characters escaped, HTML (a class folder may be
    named `<img src=x onerror=...>`) and markdown's own characters escaped, so it shows as written."""
    import html
    import re

    return re.sub(r"([\\`*_\[\]|])", r"\\\1", html.escape(safe(text), quote=False))


def search_section(s: dict) -> str:
    sr = s.get("search")
    if not sr or not sr.get("rows"):
        return ""
    lines = table([Row(**r) for r in sr["rows"]])
    inner = sr.get("inner", {})
    return (f"## How the regime was chosen (--unfreeze auto)\nThe {inner.get('photos')} training photos were split "
            f"into {inner.get('folds')} folds by content; each candidate was trained on all folds but one and scored on "
            f"that one (never on the validation photos above), for as many folds as a budget of "
            f"{sr['budget_s'] / 60:.0f} minutes allowed; chosen: {sr['chosen']} ({s['auto_reason']}).\n\n"
            + "    " + "\n    ".join(lines) + "\n\n")


def int8_section(s: dict) -> str:
    q = s.get("int8")
    if not q:
        return ""
    if q["written"]:
        return f"## int8 copy\n`model.int8.onnx`: {q['line']}.\n\n"
    return f"## int8 copy\nNot written: {cell(q['reason'])}\n\n"


def features_line(s: dict) -> str:
    """The card's line on which depths the head reads (multi-depth features), else nothing."""
    f = s.get("features") or {}
    if f.get("kind") != "multi":
        return ""
    return (f"- features: pooled outputs of {', '.join(f['depths'])} ({f['columns']} values, "
            f"each depth scaled to the last layer's size); "
            f"chosen on inner folds of the training photos: {safe(f['how'])}\n")


def model_card(s: dict) -> str:
    """A short markdown card from the training summary."""
    m = s["metrics"]

    def num(v):
        return f"{v:.3f}" if v is not None else "–"

    rows = "\n".join(f"| {cell(c)} | {s['counts']['train'].get(c, 0)} | {s['counts']['val'].get(c, 0)} | "
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
    cautions = "\n".join(f"- {cell(w)}" for w in s.get("warnings", []) + s.get("notes", [])) or "- none"
    names = ", ".join(cell(c) for c in m["classes"][:50]) + (" …" if len(m["classes"]) > 50 else "")
    return f"""# {cell(s['name'])} — edgetl model card

Image classifier for {len(m['classes'])} classes: {names}.
One file, `model.onnx`: input `uint8 image[N,{s['input_size'][0]},{s['input_size'][1]},3]` (RGB, resized and
centre-cropped by `edgetl.data.preprocess.load_image`), output `float32 probabilities[N,{len(m['classes'])}]`.

## Data
{cell(s['data'])} ({cell(s['split_note'])})

| class | train | val | precision | recall | F1 |
| --- | ---: | ---: | ---: | ---: | ---: |
{rows}

{score}

## Cautions
{cautions}

## Model
- backbone: {s['backbone']} (ImageNet-pretrained); the head sees {s['link']}
- regime: {s['regime']}{auto}
{features_line(s)}- head: {s['head']['kind']}; kept epoch {s['best_epoch']} of {s['epochs_run']};
  trained in {s['train_seconds']:.1f} s on {s['device']}
- class balance: {s['class_weights'] if isinstance(s['class_weights'], str) else 'each class weighs the same in the loss'}

## Hyper-parameters
{hp}

{search_section(s)}{int8_section(s)}## Verification
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
