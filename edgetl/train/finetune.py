"""The training loop of the regimes that train network blocks: the last N blocks plus a head on cached
activation maps (train/top.py) and the whole network on augmented raw images (train/full.py). The recipe
(warm-up, TrivialAugment, mixup/cutmix, EMA, layer-wise LR decay), batches on the device, mixed precision.
torch is imported by the functions that need it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import time

import numpy as np

from edgetl.data.pipeline import prefetch_map
from edgetl.data.preprocess import augment_view, decode_bgr, load_image
from edgetl.data.sources import read_regular
from edgetl.export.stages import stages
from edgetl.train.cut import freeze_bn
from edgetl.train.heads import Fit, balanced_accuracy, class_weights, loss_fn, val_criterion


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How the whole network is fine-tuned (`--unfreeze all`); each part measured on its own in
    scripts/bench_finetune.py."""

    warmup: float = 0.0  # share of the steps with a linear warm-up, then cosine per step (0: cosine per epoch)
    ema: float = 0.0  # exponential moving average of the weights (decay per step); 0: off
    mixup: float = 0.0  # Beta(a, a) for mixup; 0: off
    cutmix: float = 0.0  # Beta(a, a) for cutmix; 0: off (with both on, one of the two per batch)
    trivial_augment: bool = False  # TrivialAugmentWide (torchvision v2) after the crop and flip
    llrd: float = 0.0  # layer-wise learning-rate decay per block from the top; 0: one rate for the backbone

    # `--recipe` names: field, value when given without "=", accepted range (inclusive)
    OPTIONS = {"warmup": ("warmup", 0.1, (0.0, 0.5)), "ema": ("ema", 0.99, (0.0, 0.9999)),
               "mixup": ("mixup", 0.2, (0.0, 10.0)), "cutmix": ("cutmix", 1.0, (0.0, 10.0)),
               "trivialaugment": ("trivial_augment", True, None), "llrd": ("llrd", 0.7, (0.0, 1.0))}

    @classmethod
    def parse(cls, text: str) -> Recipe:
        """`--recipe warmup,ema=0.995,mixup,cutmix,trivialaugment,llrd=0.8` → Recipe; ValueError with the
        reason for anything else."""
        kw = {}
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            name, eq, value = part.partition("=")
            name = name.strip().lower().replace("-", "").replace("_", "")
            if name not in cls.OPTIONS:
                raise ValueError(f"unknown step {name!r}; use {', '.join(cls.OPTIONS)}")
            field, default, bounds = cls.OPTIONS[name]
            if bounds is None:
                if eq:
                    raise ValueError(f"{name} takes no value")
                kw[field] = True
                continue
            try:
                v = float(value) if eq else default
            except ValueError:
                raise ValueError(f"{name}={value!r} is not a number") from None
            if not (bounds[0] < v <= bounds[1]):
                raise ValueError(f"{name}={v:g} is outside ({bounds[0]:g}, {bounds[1]:g}]")
            kw[field] = v
        return cls(**kw)

    def describe(self) -> str:
        parts = [name if field == "trivial_augment" else f"{name}={getattr(self, field):g}"
                 for name, (field, _, _) in self.OPTIONS.items() if getattr(self, field)]
        return ",".join(parts) or "baseline"


DEFAULT_RECIPE = Recipe()


def fit(model, train_batches, val_x, val_y, n_classes: int, y_train: np.ndarray, params, cfg, epochs: int,
        patience: int, train_bn: bool, device: str, log=lambda s: None, recipe: Recipe | None = None,
        steps_per_epoch: int | None = None):
    """Generic loop: `train_batches()` yields (x, y) tensors per step; early stopping on validation loss.

    `params` are optimiser parameter groups (different learning rates for pretrained and new parts).
    `recipe` (full fine-tuning) adds warm-up and cosine per step, an EMA of the weights (which is what
    is validated and kept), mixup/cutmix on the uint8 images. Returns a head.Fit.
    """
    import torch

    recipe = recipe or Recipe()
    t0 = time.perf_counter()
    # channels-last is much faster for depthwise convolutions on CPUs (about 1.6x for a training step)
    model.to(memory_format=torch.channels_last)
    loss_of = loss_fn(cfg, y_train, n_classes, device)
    val_loss_of = val_criterion(cfg, y_train, n_classes, device)
    opt = torch.optim.AdamW(params, weight_decay=cfg.weight_decay)
    if recipe.warmup and steps_per_epoch:
        total_steps = max(1, epochs * steps_per_epoch)
        warm = max(1, int(recipe.warmup * total_steps))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warm if s < warm else
                                                  0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total_steps - warm))))
        per_step = True
    else:
        sched, per_step = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs)), False
    ema = _Ema(model, recipe.ema) if recipe.ema else None
    mix = _Mixer(recipe.mixup, recipe.cutmix, n_classes, cfg.seed) if recipe.mixup or recipe.cutmix else None
    hist = {"train_loss": [], "val_loss": [], "val_acc": [], "val_balanced_acc": []}
    best = (float("inf"), 0, copy.deepcopy(model.state_dict()))
    epoch = 0
    amp = autocast(device)
    images_seen, t_train = 0, 0.0
    for epoch in range(1, epochs + 1):
        model.train()
        freeze_bn(model, train_bn)
        total, n = torch.zeros((), device=device), 0
        t_epoch = time.perf_counter()
        for x, y in train_batches():
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if mix is not None:
                x, y = mix(x, y)
            with amp():
                loss = loss_of(model(layout(x)).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if per_step:
                sched.step()
            if ema is not None:
                ema.update(model)
            total += loss.detach() * len(y)  # no sync per step
            n += len(y)
        total = float(total)
        images_seen += n
        t_train += time.perf_counter() - t_epoch
        hist.setdefault("epoch_images_per_s", []).append(n / (time.perf_counter() - t_epoch))
        if not per_step:
            sched.step()
        judged = ema.model if ema is not None else model
        judged.eval()
        line = f"epoch {epoch}/{epochs}: train loss {total / max(n, 1):.4f}"
        hist["train_loss"].append(total / max(n, 1))
        if len(val_y):
            logits, ys = [], []
            with torch.no_grad(), amp():
                for x, y in val_x():
                    logits.append(judged(layout(x.to(device, non_blocking=True))).float().cpu())
                    ys.append(y.cpu())
            logits, ys = torch.cat(logits), torch.cat(ys)
            vl = float(val_loss_of(logits.to(device), ys.to(device)))
            pred = logits.argmax(1)
            hist["val_loss"].append(vl)
            hist["val_acc"].append(float((pred == ys).float().mean()))
            hist["val_balanced_acc"].append(balanced_accuracy(ys, pred, n_classes))
            line += f", val loss {vl:.4f}, val acc {hist['val_acc'][-1]:.4f}"
        else:
            vl = -epoch  # no validation photos: keep the last epoch
        log(f"{line}, {time.perf_counter() - t0:.0f} s")
        if vl < best[0] - 1e-6:
            best = (vl, epoch, copy.deepcopy(judged.state_dict()))
        elif len(val_y) and epoch - best[1] >= patience:
            break
    model.load_state_dict(best[2])
    model.eval().cpu().to(memory_format=torch.contiguous_format)
    weights = class_weights(y_train, n_classes) if cfg.balance == "weighted" else None
    hist["train_images_per_s"] = images_seen / t_train if t_train else None
    return Fit(model, best[1], epoch, hist, weights, time.perf_counter() - t0, device)


class _Ema:
    """An exponential moving average of a model's weights (buffers copied)."""

    def __init__(self, model, decay: float):
        self.model, self.decay = copy.deepcopy(model), decay
        for p in self.model.parameters():
            p.requires_grad_(False)

    def update(self, model):
        import torch

        with torch.no_grad():
            for e, p in zip(self.model.parameters(), model.parameters()):
                e.mul_(self.decay).add_(p.detach(), alpha=1 - self.decay)
            for e, b in zip(self.model.buffers(), model.buffers()):
                e.copy_(b)


class _Mixer:
    """Mixup or cutmix on a batch of uint8 NHWC images; labels become class probabilities."""

    def __init__(self, mixup: float, cutmix: float, n_classes: int, seed: int):
        self.mixup, self.cutmix, self.k = mixup, cutmix, n_classes
        self.rng = np.random.default_rng(seed)

    def __call__(self, x, y):
        import torch

        perm = torch.from_numpy(self.rng.permutation(len(x))).to(x.device)
        onehot = torch.nn.functional.one_hot(y, self.k).float()
        use_cut = self.cutmix and (not self.mixup or self.rng.random() < 0.5)
        lam = float(self.rng.beta(self.cutmix, self.cutmix) if use_cut else self.rng.beta(self.mixup, self.mixup))
        if use_cut:
            h, w = x.shape[1:3]
            ch, cw = int(h * (1 - lam) ** 0.5), int(w * (1 - lam) ** 0.5)
            cy, cx = self.rng.integers(0, h), self.rng.integers(0, w)
            t, b = max(0, cy - ch // 2), min(h, cy + ch // 2)
            left, r = max(0, cx - cw // 2), min(w, cx + cw // 2)
            x = x.clone()
            x[:, t:b, left:r] = x[perm, t:b, left:r]
            lam = 1 - (b - t) * (r - left) / (h * w)
        else:
            x = (x.float() * lam + x[perm].float() * (1 - lam)).round_().to(torch.uint8)
        return x, onehot * lam + onehot[perm] * (1 - lam)


def llrd_groups(full_model, features_model, head, lr: float, decay: float):
    """Parameter groups with the learning rate decaying by `decay` per block from the top of the backbone
    (its tail at lr·decay, the stem lowest); the head at lr."""
    st = stages(features_model)
    ordered = [st.tail] + list(reversed(st.blocks)) + [st.stem]
    groups, seen = [], set()
    for depth, module in enumerate(ordered, start=1):
        ps = [p for p in module.parameters() if id(p) not in seen]
        seen.update(id(p) for p in ps)
        if ps:
            groups.append({"params": ps, "lr": lr * decay ** depth})
    rest = [p for p in features_model.parameters() if id(p) not in seen]
    if rest:
        groups.append({"params": rest, "lr": lr * decay ** len(ordered)})
    groups.append({"params": list(head.parameters()), "lr": lr})
    return groups


def autocast(device: str):
    """bf16 autocast on a GPU that has it (the weights stay float32); nothing on the CPU."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def layout(x):
    import torch

    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 and x.dtype.is_floating_point else x


def tensor_batches(x: np.ndarray, y: np.ndarray, bs: int, shuffle: bool, seed: int, epoch_box: list,
                   device: str = "cpu"):
    """A re-iterable over (x, y) float tensors from arrays (float16 activations become float32). On a
    GPU the arrays are moved there once, and batches are cut on the device."""
    import torch

    on_gpu = device.startswith("cuda")
    xs = torch.from_numpy(np.ascontiguousarray(x)).to(device) if on_gpu else x
    ys = torch.from_numpy(y.astype(np.int64)).to(device) if on_gpu else y

    def gen():
        idx = np.arange(len(x))
        if shuffle:
            np.random.default_rng(seed + epoch_box[0]).shuffle(idx)
            epoch_box[0] += 1
        for i in range(0, len(idx), bs):
            j = idx[i:i + bs]
            if on_gpu:
                jt = torch.from_numpy(j).to(device)
                yield xs[jt].float(), ys[jt]
            else:
                yield torch.from_numpy(xs[j].astype(np.float32)), torch.from_numpy(ys[j].astype(np.int64))

    return gen


def device_batch(device: str, lr: float) -> tuple[int, float]:
    """(batch size, learning rate) for training images on `device`: larger batches on a GPU, with the
    learning rate scaled by the square root of the batch ratio."""
    bs = 256 if device.startswith("cuda") else 32
    return bs, lr * (bs / 32) ** 0.5


class TrainImages:
    """Training photos for full fine-tuning: item (j, seed) → (uint8 H×W×3, label). Picklable, so a
    torch DataLoader can read them in worker processes."""

    def __init__(self, paths, labels, spec, augment: bool, trivial_augment: bool = False):
        self.paths, self.labels, self.spec, self.augment = list(paths), np.asarray(labels), spec, augment
        self.trivial_augment = trivial_augment

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, item):
        j, seed = item
        path = self.paths[j]
        data = read_regular(path)
        if self.augment:
            img = augment_view(decode_bgr(data, self.spec.resize_size, str(path)), self.spec, int(seed))
            if self.trivial_augment:
                img = _trivial_augment(img, int(seed))
        else:
            img = load_image(data, self.spec, str(path))
        return img, int(self.labels[j])


def _trivial_augment(img: np.ndarray, seed: int) -> np.ndarray:
    """TrivialAugmentWide (torchvision v2) on a uint8 H×W×3 image, seeded."""
    import torch
    from torchvision.transforms import v2

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed % (2**63))
        out = v2.TrivialAugmentWide()(torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1))
    return np.ascontiguousarray(out.permute(1, 2, 0).numpy())


def image_batches(images: TrainImages, bs: int, rng, device: str, workers: int | None = None):
    """A re-iterable over (uint8 [N,H,W,3], labels) batches of `images` in a new seeded order each time.

    On a GPU: a torch DataLoader with worker processes and pinned memory (the GPU would wait for one
    Python process); on the CPU: decoding threads (the cores are for the model)."""
    import torch

    def epoch_items():
        order = rng.permutation(len(images))
        seeds = rng.integers(0, 2**63 - 1, len(order))
        return [(int(j), int(s)) for j, s in zip(order, seeds)]

    if device.startswith("cuda"):
        n = workers or min(16, os.cpu_count() or 1)

        class Epoch(torch.utils.data.Sampler):
            def __iter__(self):
                return iter(epoch_items())

            def __len__(self):
                return len(images)

        loader = torch.utils.data.DataLoader(images, batch_size=bs, sampler=Epoch(), num_workers=n, pin_memory=True,
                                             persistent_workers=n > 0, prefetch_factor=4 if n else None)
        return lambda: iter(loader)

    def gen():
        xs, ys = [], []
        for _, (img, label) in prefetch_map(images.__getitem__, epoch_items(), workers, window=64):
            xs.append(img)
            ys.append(label)
            if len(xs) == bs:
                yield torch.from_numpy(np.stack(xs)), torch.tensor(ys)
                xs, ys = [], []
        if xs:
            yield torch.from_numpy(np.stack(xs)), torch.tensor(ys)

    return gen


