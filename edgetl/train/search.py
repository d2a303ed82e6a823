"""`--unfreeze auto`: choose the training regime by measurement, within a time budget.

The training photos (never the validation photos that are reported) are cross-validated: split by
content into FOLDS folds, each candidate is trained on the other folds and scored on one. Each candidate
regime's cost is first estimated from short probes on this device (inference and training steps per
second), later from its own measured time. Every candidate first runs one fold (cheapest first), then
more folds candidate by candidate (cheapest first), while its next run plus a final run on all training
photos fits the budget. Candidates are compared on the folds both completed
(mean balanced accuracy, then mean class-balanced loss); one that trains less of the network is kept when
it is within one standard error of the best (`choose`). The chosen one is then trained as usual on all
training photos and scored on the real validation photos. The table of candidates goes to the output,
metrics.json and the model card.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from edgetl.export.torch_onnx import image_module
from edgetl.train.cut import top_and_head
from edgetl.train.finetune import autocast, device_batch, layout

AUG = 4  # cached augmented views for the frozen candidates that augment
FOLDS = 5  # cross-validation folds of the training photos (as many as the budget allows are run)


@dataclasses.dataclass(frozen=True)
class Candidate:
    name: str
    unfreeze: str  # "0" | "1".."3" | "all"
    kind: str  # linear | mlp
    augment: int
    features: str = "last"  # "multi": pooled features of several depths (train/depths.py)


CANDIDATES = (
    Candidate("linear head", "0", "linear", 0),
    Candidate("linear head on several depths", "0", "linear", 0, "multi"),
    Candidate("mlp head", "0", "mlp", 0),
    Candidate(f"linear head, {AUG} augmented views", "0", "linear", AUG),
    Candidate(f"mlp head, {AUG} augmented views", "0", "mlp", AUG),
    Candidate("last block + linear head", "1", "linear", 0),
    Candidate("last 2 blocks + linear head", "2", "linear", 0),
    Candidate("last 3 blocks + linear head", "3", "linear", 0),
    Candidate(f"last 2 blocks + linear head, {AUG} augmented views", "2", "linear", AUG),
    Candidate("whole network, augmented", "all", "linear", 1),
)
DEFAULT_BUDGET_MIN = {"cuda": 5.0, "cpu": 10.0}
MULTI_HEADS = 13  # heads a multi-depth fold trains: 4 depth sets x 3 inner folds, then the chosen one


def default_budget_min(device: str) -> float:
    import torch

    on_gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    return DEFAULT_BUDGET_MIN["cuda" if on_gpu else "cpu"]


@dataclasses.dataclass
class Probe:
    """Seconds per image on this device: embedding (decode + inference), training a top of N blocks, the
    whole network."""

    embed: float
    top: dict[int, float]
    full: float

    def cost(self, c: Candidate, n_images: int, n_train: int) -> float:
        """Estimated seconds for `c`: embeddings not yet cached, then training on `n_train` photos."""
        views = 1 + c.augment
        if c.features == "multi":  # every photo through the multi-depth backbone, then heads for each depth set
            return self.embed * n_images + 0.002 * n_train * 60 / 10 * MULTI_HEADS + 2
        if c.unfreeze == "0":
            return self.embed * n_train * c.augment + 0.002 * n_train * views * 60 / 10 + 2
        if c.unfreeze == "all":
            return self.full * n_train * 10 + 10  # about 10 epochs, and the export
        k = int(c.unfreeze)  # activation maps of every photo (and of the augmented views), about 12 epochs
        return self.embed * (n_images + n_train * c.augment) + self.top[k] * n_train * views * 12 + 5


def probe(bb, stages, embed_s_per_image: float, device: str, block_counts=(1, 2, 3)) -> Probe:
    """Time a few training steps of each candidate's trainable part on random data (batch as training)."""
    import torch
    import torch.nn.functional as F

    dev = device if device in ("cpu", "cuda") else ("cuda" if torch.cuda.is_available() else "cpu")
    bs, _ = device_batch(dev, 1e-3)
    amp = autocast(dev)
    h, w = bb.spec.input_size

    def per_image(model, x, steps=3) -> float:
        model.to(dev).train()
        model.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-6)
        y = torch.zeros(len(x), dtype=torch.long, device=dev)
        x = layout(x.to(dev))
        times = []
        for _ in range(steps + 1):
            t = time.perf_counter()
            with amp():
                loss = F.cross_entropy(model(x).float(), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if dev == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return float(np.median(times[1:])) / len(x)

    tops = {}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        for n in block_counts:
            k = len(stages.blocks) - n
            with torch.no_grad():
                act = torch.nn.Sequential(stages.stem, *stages.blocks[:k])(torch.randn(1, 3, h, w))
            top = top_and_head(stages, k, torch.nn.Linear(bb.dim, 2))
            for p in top.parameters():
                p.requires_grad_(True)
            tops[n] = per_image(top, torch.randn(bs, *act.shape[1:]))
        model = torch.nn.Sequential(image_module(bb), torch.nn.Linear(bb.dim, 2))
        for p in model.parameters():
            p.requires_grad_(True)
        full = per_image(model, torch.randint(0, 255, (bs, h, w, 3), dtype=torch.uint8), steps=2)
    for p in bb.model.parameters():  # the probe must not change the backbone it borrowed
        p.requires_grad_(False)
    return Probe(embed_s_per_image, tops, full + (0.004 if dev == "cpu" else 0.0005))  # + decoding/augmenting


@dataclasses.dataclass
class Row:
    candidate: str
    estimated_s: float
    seconds: float | None = None  # all its folds together
    accuracy: float | None = None  # means over its folds
    balanced_accuracy: float | None = None
    loss: float | None = None
    status: str = "not tried"
    folds: int = 0
    per_fold: list = dataclasses.field(default_factory=list)  # [balanced acc., accuracy, loss, photos] per fold

    def add(self, seconds: float, fold_score: tuple[float, float, float], photos: int) -> None:
        self.seconds = (self.seconds or 0.0) + seconds
        self.per_fold.append([*(float(v) for v in fold_score), int(photos)])
        self.folds = len(self.per_fold)
        self.balanced_accuracy, self.accuracy, self.loss = (float(np.mean([f[j] for f in self.per_fold]))
                                                            for j in range(3))
        self.status = "tried"

    def fail(self, why: str) -> None:
        """A failed run rules the candidate out: its earlier folds are dropped with it."""
        self.per_fold, self.folds = [], 0
        self.accuracy = self.balanced_accuracy = self.loss = None
        self.status = f"failed: {why}"

    def key(self, folds: int) -> tuple[float, float]:
        """(mean balanced accuracy, -mean loss) over the first `folds` folds: larger is better."""
        f = self.per_fold[:folds]
        return float(np.mean([x[0] for x in f])), -float(np.mean([x[2] for x in f]))


def best(rows: list[Row]) -> Row | None:
    """The winner among the tried rows, each pair compared on the folds both completed (cheap candidates
    run more folds than expensive ones; an expensive one is compared with them on equal terms)."""
    tried = sorted((r for r in rows if r.per_fold), key=lambda r: -r.folds)
    champion = None
    for r in tried:
        if champion is None:
            champion = r
            continue
        m = min(r.folds, champion.folds)
        if r.key(m) > champion.key(m):
            champion = r
    return champion


def depth(c: Candidate) -> int:
    """How much of the network a candidate trains: 0 (a head on frozen features) … 99 (all of it)."""
    return 99 if c.unfreeze == "all" else int(c.unfreeze)


def choose(rows: dict[Candidate, Row]) -> tuple[Row, str]:
    """The one-standard-error rule across depths: the best row (`best`), unless a candidate that trains
    less of the network (the best of its depth) scores within one standard error of it on the folds both
    ran. The standard error is the binomial one of the best's balanced accuracy over those folds' photos
    (at least one photo). Among heads on frozen features the best is kept as is: all run every fold."""
    top = best(list(rows.values()))
    if top is None:
        return None, ""
    for d in sorted({depth(c) for c in rows}):
        r = best([row for c, row in rows.items() if depth(c) == d])
        if r is top:
            break
        if r is None:
            continue
        m = min(r.folds, top.folds)
        p, n = top.key(m)[0], sum(f[3] for f in top.per_fold[:m])
        se = max(float(np.sqrt(p * (1 - p) / n)), 1 / n)
        if top.key(m)[0] - r.key(m)[0] <= se:
            return r, (f"within one standard error ({se:.3f}) of the best, {top.candidate} ({top.key(m)[0]:.4f} vs "
                       f"{r.key(m)[0]:.4f} on {m} folds), and trains less of the network")
    return top, "the best"


def table(rows: list[Row]) -> list[str]:
    lines = [f"{'candidate':<46} {'est. s':>7} {'took s':>7} {'folds':>5} {'inner acc':>9} {'balanced':>9} "
             f"{'loss':>7}  status"]
    for r in rows:
        took = f"{r.seconds:.0f}" if r.seconds is not None else "-"
        acc = f"{r.accuracy:.4f}" if r.accuracy is not None else "-"
        bal = f"{r.balanced_accuracy:.4f}" if r.balanced_accuracy is not None else "-"
        loss = f"{r.loss:.4f}" if r.loss is not None else "-"
        lines.append(f"{r.candidate:<46} {r.estimated_s:>7.0f} {took:>7} {r.folds:>5} {acc:>9} {bal:>9} {loss:>7}  "
                     f"{r.status}")
    return lines


def score(fit) -> tuple[float, float, float]:
    """(balanced accuracy, accuracy, class-balanced loss) on the inner validation photos at the kept epoch."""
    h = fit.history
    i = max(0, fit.best_epoch - 1)
    return h["val_balanced_acc"][i], h["val_acc"][i], h["val_loss"][i]
