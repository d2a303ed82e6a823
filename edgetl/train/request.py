"""What `train-head` is asked and what it answers, typed: the request (every option of the command), the
result (where the output set went and its summary, which is metrics.json), and the job that each
training regime receives (one split of one dataset, with the options it needs).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable

import numpy as np

from edgetl.data.engines import Engine
from edgetl.errors import DataError
from edgetl.train.finetune import Recipe
from edgetl.train.heads import HeadConfig


@dataclasses.dataclass
class TrainRequest:
    """Everything `train_head` needs. `engine` (a data.engines.Engine): where the embedding runs, and
    the endpoint of s3:// data."""

    data: str | os.PathLike
    backbone: str | os.PathLike  # an exported backbone.onnx
    cache: str | os.PathLike
    out: str | os.PathLike
    head: HeadConfig = dataclasses.field(default_factory=HeadConfig)
    device: str = "auto"
    val_fraction: float = 0.2
    batch_size: int = 32
    unfreeze: str = "0"  # "0" | "N" | "all" | "auto"
    augment: int = 0
    train_bn: bool = False
    weights: str | None = None
    int8: bool = False
    budget_min: float | None = None
    recipe: Recipe | None = None
    engine: Engine | None = None
    features: str = "last"  # "last": the backbone's embedding; "multi": pooled features of several depths

    @property
    def torch_device(self) -> str | None:
        return None if self.device == "auto" else ("cuda" if self.device == "cuda" else "cpu")


@dataclasses.dataclass
class TrainResult:
    """The written output set and its summary (the content of metrics.json)."""

    out: Path
    summary: dict

    @property
    def metrics(self) -> dict:
        return self.summary["metrics"]

    @property
    def warnings(self) -> list[str]:
        return self.summary["warnings"]


@dataclasses.dataclass
class Job:
    """One training run of a regime: the dataset, the split it trains and validates on, and the options."""

    ds: object  # data.scan.Dataset
    split: object  # data.split.Split
    y_train: np.ndarray
    y_val: np.ndarray
    cfg: HeadConfig
    augment: int
    cache_root: str | os.PathLike
    device: str
    torch_device: str | None
    batch_size: int
    log: Callable[[str], None]


@dataclasses.dataclass
class Trained:
    """What a regime trained: two ONNX artifacts to fuse, the second one's export parity, the fit."""

    first: object  # onnx.ModelProto: backbone or trunk
    second: object  # onnx.ModelProto: head or top
    second_diff: float
    fit: object  # heads.Fit
    regime: str
    features: dict | None = None  # which depths the head reads (--features multi); None: the last layer


def check_classes(ds, usable: list[int]) -> None:
    """DataError unless DATA has two or more classes, each with at least one readable image."""
    if not ds.classes:
        raise DataError(f"{ds.root} has no class folders: put images in {ds.root}/<class>/")
    if len(ds.classes) < 2:
        raise DataError(f"only one class ({ds.classes[0]!r}) in {ds.root}: a classifier needs at least two")
    have = {ds.items[i].label for i in usable}
    empty = [c for c in ds.classes if c not in have]  # (one pass over the items, then over the classes)
    if empty:
        more = f" (nor {len(empty) - 1} more)" if len(empty) > 1 else ""
        why = next((n.split(": ", 1)[-1] for n in getattr(ds, "notes", ()) if n.startswith("skipped unreadable folder")
                    and f"/{empty[0]}:" in n), None)  # its folder could not be read: say so
        raise DataError(f"class {empty[0]!r} has no readable images{more}"
                        + (f" (its folder cannot be read: {why}; fix its permissions or move it out)" if why else ""))


def counts(ds, idx) -> dict[str, int]:
    out = {c: 0 for c in ds.classes}
    for i in idx:
        out[ds.items[i].label] += 1
    return out


def labels(ds, idx) -> np.ndarray:
    """Class indices of the dataset items `idx`."""
    cls = {c: i for i, c in enumerate(ds.classes)}
    return np.array([cls[ds.items[i].label] for i in idx])


def rows(r, idx) -> np.ndarray:
    """The cached embeddings of items `idx` of an embed result."""
    return r.namespace.load([r.keys[i] for i in idx])[1]


def default_out(data) -> Path:
    return Path("exports") / (Path(data).resolve().name or "model")
