"""`edgetl sweep`: which backbone, by measurement — accuracy from heads on cached embeddings (cheap),
latency as `edgetl bench` measures it (batch 1, interleaved, on this machine), the Pareto front.

Every backbone is judged on the same photos: the split is by content and seeded, so it does not
depend on the backbone. The recommendation is the fastest backbone whose validation accuracy is
within `TIE` of the best one (the rest is not a difference a validation set of this size can show).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np

from edgetl import contract as C
from edgetl.backbones import check_name, exported
from edgetl.data.embed import embed_folder
from edgetl.data.scan import scan
from edgetl.data.split import make_split
from edgetl.deploy.bench import time_interleaved
from edgetl.errors import DataError
from edgetl.export.depths import read_layout
from edgetl.export.graph import load, metadata
from edgetl.files import output_set, write_text
from edgetl.ort import session
from edgetl.quality.metrics import metrics
from edgetl.train.card import pyplot, save_figure
from edgetl.train.depths import fit_depths, multi_backbone
from edgetl.train.heads import HeadConfig, train
from edgetl.train.request import Job, check_classes

TIE = 0.01  # accuracy differences below one point are not worth a slower model


@dataclasses.dataclass
class Row:
    backbone: str
    input: str
    accuracy: float | None
    balanced_accuracy: float | None
    n_val: int
    latency_ms: float
    size_mb: float
    embed_s: float
    pareto: bool = False


def sweep(data, names: list[str], cache_root, head: str = "linear", device: str = "auto", threads: int | None = None,
          val_fraction: float = 0.2, seed: int = 0, log=lambda s: None, features: str = "last") -> dict:
    """Embed `data` with every backbone in `names`, train a head on each, time each at batch 1.

    Returns {"rows": [Row...], "recommended": name, "reason": text, "split": note}.
    """
    names = list(dict.fromkeys(names))
    for name in names:  # every name is checked before any work: a typo must not cost the first backbone's run
        p = Path(name)
        if p.suffix.lower() == ".onnx" or os.sep in name or p.is_file():
            if not p.is_file():
                raise DataError(f"backbone file not found: {name}")
        else:
            check_name(name)  # UnknownBackbone, with the close matches
    ds = scan(data, exclude=[cache_root])
    check_classes(ds, list(range(len(ds.items))))
    rows, sessions, split_note = [], {}, ""
    for k, name in enumerate(names, 1):
        t0 = time.perf_counter()
        log(f"[{k}/{len(names)}] {name}: embedding {len(ds.items)} photos (cached ones are reused)")
        path = exported(name, log=log)
        if features == "multi":  # the multi-depth export of the same backbone (its own cache namespace)
            path = multi_backbone(metadata(load(path, C.FORMAT_BACKBONE)), None, cache_root, log)
        r = embed_folder(ds, path, cache_root, device=device, progress=None)
        log(f"[{k}/{len(names)}] {name}: embedded in {r.seconds:.0f} s; training the head, then timing")
        usable = [i for i, k in enumerate(r.keys) if k is not None]
        split = make_split(r.dataset, r.keys, usable, val_fraction, seed)
        split_note = split.note
        cls = {c: i for i, c in enumerate(ds.classes)}
        y_tr = np.array([cls[ds.items[i].label] for i in split.train])
        y_va = np.array([cls[ds.items[i].label] for i in split.val])
        x_tr = r.namespace.load([r.keys[i] for i in split.train])[1]
        x_va = r.namespace.load([r.keys[i] for i in split.val])[1]
        if not len(y_va):
            raise DataError(f"{data} leaves no validation photos to compare backbones on")
        cfg = HeadConfig(kind=head, seed=seed)
        if features == "multi":  # depths chosen on inner folds of the training photos, as train-head does
            job = Job(r.dataset, split, y_tr, y_va, cfg, 0, cache_root, device, None, 32, lambda line: None)
            depths = read_layout(metadata(load(path, C.FORMAT_BACKBONE)), x_tr.shape[1], path)
            _, cols, scale, fit, _ = fit_depths(job, r, depths)
            x_va = x_va[:, cols] * scale
        else:
            fit = train(x_tr, y_tr, x_va, y_va, len(ds.classes), cfg)
        import torch

        with torch.no_grad():
            pred = fit.model(torch.from_numpy(x_va)).argmax(1).numpy()
        m = metrics(y_va, pred, ds.classes)
        sess = session(path, device, threads)
        spec_h, spec_w = r.namespace.meta["preprocess"]["input_size"]
        x1 = np.zeros((1, spec_h, spec_w, 3), np.uint8)
        sessions[name] = (sess, x1)
        rows.append(Row(name, f"{spec_h}x{spec_w}", m["accuracy"], m["balanced_accuracy"], m["n"], 0.0,
                        os.path.getsize(path) / 1e6, r.seconds))
        log(f"[{k}/{len(names)}] {name}: val accuracy {m['accuracy']:.4f}, balanced {m['balanced_accuracy']:.4f} "
            f"({m['n']} photos), {time.perf_counter() - t0:.0f} s")
    log(f"timing batch-1 latency of {len(sessions)} backbones, interleaved (at most 20 s)")
    timing = time_interleaved({n: (lambda s=s, x=x: s.run(None, {"image": x})) for n, (s, x) in sessions.items()},
                              rounds=60, budget_s=20)
    for row in rows:
        row.latency_ms = timing[row.backbone]["p50_ms"]
    mark_pareto(rows)
    rec, reason = recommend(rows)
    return {"rows": rows, "recommended": rec, "reason": reason, "split": split_note,
            "provider": next(iter(sessions.values()))[0].get_providers()[0]}


def mark_pareto(rows: list[Row]) -> None:
    """A row is on the front when no other row is at least as accurate and at least as fast, and better in one."""
    for r in rows:
        r.pareto = not any((o.accuracy >= r.accuracy and o.latency_ms <= r.latency_ms)
                           and (o.accuracy > r.accuracy or o.latency_ms < r.latency_ms) for o in rows if o is not r)


def recommend(rows: list[Row]) -> tuple[str, str]:
    best = max(r.accuracy for r in rows)
    close = sorted((r for r in rows if r.accuracy >= best - TIE), key=lambda r: r.latency_ms)
    pick = close[0]
    top = max(rows, key=lambda r: (r.accuracy, -r.latency_ms))
    if pick is top:
        others = [r for r in rows if r is not pick]
        faster = [r for r in others if r.latency_ms < pick.latency_ms]
        why = (f"the most accurate ({pick.accuracy:.4f})"
               + (f"; faster ones lose {100 * (pick.accuracy - max(r.accuracy for r in faster)):.1f} points or more"
                  if faster else ", and the fastest"))
    else:
        why = (f"within {100 * TIE:.0f} point of the most accurate ({top.backbone}, {top.accuracy:.4f} vs "
               f"{pick.accuracy:.4f}) and {top.latency_ms / pick.latency_ms:.2f}x faster")
    return pick.backbone, why


def plot(result: dict, path) -> None:
    """Accuracy against batch-1 latency, the Pareto front joined, the recommendation circled."""
    plt = pyplot()
    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for r in rows:
        ax.scatter(r.latency_ms, r.accuracy, s=60, color="C0" if r.pareto else "C7", zorder=3)
        ax.annotate(r.backbone, (r.latency_ms, r.accuracy), textcoords="offset points", xytext=(6, 4), fontsize=8)
        if r.backbone == result["recommended"]:
            ax.scatter(r.latency_ms, r.accuracy, s=260, facecolors="none", edgecolors="C3", linewidths=1.5, zorder=4)
    front = sorted((r for r in rows if r.pareto), key=lambda r: r.latency_ms)
    ax.plot([r.latency_ms for r in front], [r.accuracy for r in front], color="C0", lw=1, ls="--", label="Pareto front")
    ax.set_xlabel(f"latency at batch 1, ms ({result['provider'].replace('ExecutionProvider', '')})")
    ax.set_ylabel("validation accuracy")
    ax.set_title(f"recommended: {result['recommended']}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def table(result: dict) -> str:
    lines = [f"{'backbone':<22} {'input':>8} {'accuracy':>9} {'balanced':>9} {'latency':>10} {'size':>8}  pareto"]
    for r in result["rows"]:
        lines.append(f"{r.backbone:<22} {r.input:>8} {r.accuracy:>9.4f} {r.balanced_accuracy:>9.4f} "
                     f"{r.latency_ms:>7.2f} ms {r.size_mb:>5.1f} MB  {'yes' if r.pareto else ''}")
    return "\n".join(lines)


def write(result: dict, out) -> Path:
    """sweep.json and sweep.png, as one output set."""
    with output_set(out) as tmp:
        write_text(tmp / "sweep.json", json.dumps(
            {**result, "rows": [dataclasses.asdict(r) for r in result["rows"]]}, indent=1, allow_nan=False))
        plot(result, tmp / "sweep.png")
    return Path(out)
