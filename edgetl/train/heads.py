"""Heads trained on cached embeddings: `linear` (a new softmax) or `mlp` (hidden layers, dropout, softmax).

Training sees only arrays; the backbone never enters the training graph.
"""

from __future__ import annotations

import copy
import dataclasses
import time

import numpy as np

from edgetl.errors import DataError


@dataclasses.dataclass
class HeadConfig:
    kind: str = "linear"  # linear | mlp
    hidden: tuple[int, ...] = (512,)
    dropout: float = 0.2
    lr: float = 1e-3
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    balance: str = "weighted"  # weighted | sampler | none | legacy: how classes of different sizes are balanced
    max_epochs: int = 300
    patience: int = 20
    batch_size: int | None = None  # default: n/16 clamped to [16, 512]
    seed: int = 0

    def describe(self) -> dict:
        d = dataclasses.asdict(self)
        if self.kind == "linear":
            d.pop("hidden")
            d.pop("dropout")
        return d


def build(cfg: HeadConfig, dim: int, n_classes: int):
    """The head as a torch module: embeddings [N, D] → logits [N, C]."""
    import torch.nn as nn

    if cfg.kind == "linear":
        return nn.Sequential(nn.Linear(dim, n_classes))
    if cfg.kind != "mlp":
        raise DataError(f"unknown head {cfg.kind!r}; use linear or mlp")
    if not cfg.hidden or any(h <= 0 for h in cfg.hidden):
        raise DataError("--hidden needs positive layer sizes, e.g. 512,256")
    layers, width = [], dim
    for h in cfg.hidden:
        layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(cfg.dropout)]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, n_classes))


@dataclasses.dataclass
class Fit:
    """What a training run gives back (heads here; top blocks and whole networks in finetune)."""

    model: object  # torch module (logits), best epoch restored, eval mode, on the CPU
    best_epoch: int
    epochs_run: int
    history: dict  # train_loss, val_loss, val_acc per epoch
    class_weights: list[float] | None
    seconds: float
    device: str


def train(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, n_classes: int,
          cfg: HeadConfig, device: str | None = None, log=None) -> Fit:
    """Train a head; the best epoch by class-balanced validation loss is restored.

    Imbalance: each class weighs the same in the loss (`cfg.balance`, see `loss_fn`). Without
    validation images the head trains for NO_VAL_EPOCHS epochs and the last one is kept.
    """
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    threads = torch.get_num_threads()
    if device == "cpu":  # small matrices: one thread is as fast idle, and many times faster on a busy machine
        torch.set_num_threads(1)
    try:
        return _train(x_train, y_train, x_val, y_val, n_classes, cfg, device, log)
    finally:
        torch.set_num_threads(threads)


def _train(x_train, y_train, x_val, y_val, n_classes, cfg, device, log=None) -> Fit:
    import torch

    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    xt = torch.as_tensor(x_train, dtype=torch.float32, device=device)
    yt = torch.as_tensor(y_train, dtype=torch.long, device=device)
    xv = torch.as_tensor(x_val, dtype=torch.float32, device=device)
    yv = torch.as_tensor(y_val, dtype=torch.long, device=device)
    n = len(xt)
    loss_of = loss_fn(cfg, y_train, n_classes, device)
    val_loss_of = val_criterion(cfg, y_train, n_classes, device)
    head = build(cfg, x_train.shape[1], n_classes).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    bs = cfg.batch_size or int(np.clip(n // 16, 16, 512))
    sampler = balanced_sampler(y_train, n_classes, cfg.seed) if cfg.balance == "sampler" else None
    has_val = len(xv) > 0
    epochs = cfg.max_epochs if has_val else min(cfg.max_epochs, NO_VAL_EPOCHS)
    best = (float("inf"), -1, None)
    shown = t0
    hist = {"train_loss": [], "val_loss": [], "val_acc": [], "val_balanced_acc": []}
    epoch = 0
    for epoch in range(1, epochs + 1):
        head.train()
        perm = torch.as_tensor(sampler(n), device=device) if sampler else torch.randperm(n, generator=g).to(device)
        total = 0.0
        for i in range(0, n, bs):
            idx = perm[i:i + bs]
            loss = loss_of(head(xt[idx]), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        head.eval()
        hist["train_loss"].append(total / n)
        if has_val:
            with torch.no_grad():
                logits = head(xv)
            vloss = float(val_loss_of(logits, yv))
            pred = logits.argmax(1)
            hist["val_loss"].append(vloss)
            hist["val_acc"].append(float((pred == yv).float().mean()))
            hist["val_balanced_acc"].append(balanced_accuracy(yv, pred, n_classes))
        else:
            vloss = -epoch  # no validation: the last epoch is the one kept
        if vloss < best[0] - 1e-6:
            best = (vloss, epoch, copy.deepcopy(head.state_dict()))
        elif has_val and epoch - best[1] >= cfg.patience:
            break
        if log and time.perf_counter() - shown > 10:  # a long run says where it is
            shown = time.perf_counter()
            log(f"epoch {epoch}/{epochs} after {shown - t0:.0f} s (best so far: epoch {best[1]})")
    head.load_state_dict(best[2])
    head.eval().cpu()
    weights = class_weights(y_train, n_classes) if cfg.balance == "weighted" else None
    return Fit(head, best[1], epoch, hist, weights, time.perf_counter() - t0, device)


# Without validation images there is nothing to stop on: train this many epochs (about the median best
# epoch of the linear head on the shared datasets) and keep the last.
NO_VAL_EPOCHS = 60


def class_weights(y: np.ndarray, n_classes: int) -> list[float]:
    """n / (C * n_c) per class: each class weighs the same in the loss whatever its size."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    return np.where(counts > 0, len(y) / (n_classes * np.maximum(counts, 1)), 0.0).tolist()


def loss_fn(cfg: HeadConfig, y_train: np.ndarray, n_classes: int, device):
    """The training loss (logits, labels) → scalar, for `cfg.balance`:

    weighted  each sample weighs n / (C · n_its_class), applied to its whole label-smoothed loss, so that
              every class weighs the same and smoothing stays uniform over the classes (PyTorch's
              cross_entropy(weight=…, label_smoothing=…) instead weights the smoothing term of every
              class by that class's weight, which pulls predictions towards the rare classes);
    sampler   plain label-smoothed loss, batches drawn class-balanced (see `balanced_sampler`);
    none      plain label-smoothed loss;
    legacy    cross_entropy(weight=…, label_smoothing=…): kept only to measure against.
    """
    import torch
    import torch.nn.functional as F

    eps = cfg.label_smoothing
    if cfg.balance == "legacy":
        wt = torch.tensor(class_weights(y_train, n_classes), dtype=torch.float32, device=device)
        return lambda logits, y: F.cross_entropy(logits, y, weight=wt, label_smoothing=eps)
    w = (torch.tensor(class_weights(y_train, n_classes), dtype=torch.float32, device=device)
         if cfg.balance == "weighted" else None)

    def loss(logits, y):
        logp = F.log_softmax(logits, dim=1)
        if y.dtype.is_floating_point:  # class probabilities (mixup, cutmix)
            per = -(1 - eps) * (y * logp).sum(1) - eps * logp.mean(1)
            sw = y @ w if w is not None else None
        else:
            per = -(1 - eps) * logp.gather(1, y[:, None])[:, 0] - eps * logp.mean(1)
            sw = w[y] if w is not None else None
        if sw is None:
            return per.mean()
        return (per * sw).sum() / sw.sum()

    return loss


def val_criterion(cfg: HeadConfig, y_train: np.ndarray, n_classes: int, device):
    """The early-stopping criterion (logits, labels) → scalar: the mean over classes of each class's
    mean validation cross-entropy, so that the largest class cannot hide the others ("legacy": the
    old class-weighted loss, for comparison only)."""
    import torch
    import torch.nn.functional as F

    if cfg.balance == "legacy":
        wt = torch.tensor(class_weights(y_train, n_classes), dtype=torch.float32, device=device)
        return lambda logits, y: F.cross_entropy(logits, y, weight=wt)

    def crit(logits, y):
        nll = F.cross_entropy(logits, y, reduction="none")
        per_class = torch.zeros(n_classes, device=logits.device).index_add_(0, y, nll)
        counts = torch.bincount(y, minlength=n_classes)
        present = counts > 0
        return (per_class[present] / counts[present]).mean()

    return crit


def balanced_accuracy(y, pred, n_classes: int) -> float:
    """Mean recall over the classes present in y (torch tensors or numpy arrays)."""
    y, pred = np.asarray(y.cpu() if hasattr(y, "cpu") else y), np.asarray(pred.cpu() if hasattr(pred, "cpu") else pred)
    recalls = [float((pred[y == c] == c).mean()) for c in range(n_classes) if (y == c).any()]
    return float(np.mean(recalls)) if recalls else float("nan")


def balanced_sampler(y: np.ndarray, n_classes: int, seed: int):
    """n → n sample indices drawn with every class equally likely (with replacement), seeded."""
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(y == c) for c in range(n_classes) if (y == c).any()]

    def draw(n: int) -> np.ndarray:
        cls = rng.integers(0, len(by_class), n)
        return np.array([by_class[c][rng.integers(0, len(by_class[c]))] for c in cls], dtype=np.int64)

    return draw
