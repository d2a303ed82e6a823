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
    class_weights: bool = True
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


def with_softmax(model):
    """Wrap a trained module (logits) for export: its input → probabilities (softmax in the graph)."""
    import torch

    class WithSoftmax(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.head = m

        def forward(self, x):
            return torch.softmax(self.head(x), dim=1)

    return WithSoftmax(model).eval()


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
    """Train a head; early stopping on validation loss, best epoch restored.

    Class weights (n / (C * n_c)) counter imbalance; label smoothing and weight decay regularise.
    """
    import torch
    import torch.nn.functional as F

    t0 = time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    xt = torch.as_tensor(x_train, dtype=torch.float32, device=device)
    yt = torch.as_tensor(y_train, dtype=torch.long, device=device)
    xv = torch.as_tensor(x_val, dtype=torch.float32, device=device)
    yv = torch.as_tensor(y_val, dtype=torch.long, device=device)
    n = len(xt)
    weights = class_weights(y_train, n_classes) if cfg.class_weights else None
    wt = torch.tensor(weights, dtype=torch.float32, device=device) if weights else None
    head = build(cfg, x_train.shape[1], n_classes).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    bs = cfg.batch_size or int(np.clip(n // 16, 16, 512))
    best = (float("inf"), -1, None)
    hist = {"train_loss": [], "val_loss": [], "val_acc": []}
    epoch = 0
    for epoch in range(1, cfg.max_epochs + 1):
        head.train()
        perm = torch.randperm(n, generator=g).to(device)
        total = 0.0
        for i in range(0, n, bs):
            idx = perm[i:i + bs]
            loss = F.cross_entropy(head(xt[idx]), yt[idx], weight=wt, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        head.eval()
        with torch.no_grad():
            logits = head(xv)
            vloss = float(F.cross_entropy(logits, yv, weight=wt)) if len(xv) else total / n
            vacc = float((logits.argmax(1) == yv).float().mean()) if len(xv) else float("nan")
        hist["train_loss"].append(total / n)
        hist["val_loss"].append(vloss)
        hist["val_acc"].append(vacc)
        if vloss < best[0] - 1e-6:
            best = (vloss, epoch, copy.deepcopy(head.state_dict()))
        elif epoch - best[1] >= cfg.patience:
            break
    head.load_state_dict(best[2])
    head.eval().cpu()
    return Fit(head, best[1], epoch, hist, weights, time.perf_counter() - t0, device)


def class_weights(y: np.ndarray, n_classes: int) -> list[float]:
    """n / (C * n_c) per class: each class weighs the same in the loss whatever its size."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    return np.where(counts > 0, len(y) / (n_classes * np.maximum(counts, 1)), 0.0).tolist()
