"""Fewer frozen layers: cut a backbone into stem → blocks → tail, export the frozen trunk, train the
last N blocks (from their pretrained weights) plus a head on cached activation maps; or fine-tune
everything on raw images with augmentation (`--unfreeze all`).

Cut points exist for the common block structures: timm EfficientNet/MobileNet (`blocks`), ResNet
(`layer1..4`), timm `stages` models (ConvNeXt, …), and torchvision `features` models
(MobileNet, EfficientNet). Every cut is verified: stem → blocks → tail must equal the backbone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np

from edgetl import contract as C
from edgetl.errors import DataError, EdgetlError


class CutError(EdgetlError):
    pass


@dataclasses.dataclass
class Stages:
    stem: object  # nn.Module: normalised NCHW → first block's input
    blocks: list  # [nn.Module]
    tail: object  # nn.Module: last block's output → pooled embedding [N, D]


def stages(model) -> Stages:
    """Split a feature extractor (classifier removed) into stem, blocks and tail; CutError if unknown."""
    import torch.nn as nn

    def seq(*mods):
        return nn.Sequential(*[m for m in mods if m is not None])

    flat = nn.Flatten(1)
    if hasattr(model, "conv_stem") and hasattr(model, "blocks") and hasattr(model, "conv_head"):  # timm EfficientNet
        return Stages(seq(model.conv_stem, model.bn1), list(model.blocks),
                      seq(model.conv_head, model.bn2, model.global_pool, flat))
    if all(hasattr(model, f"layer{i}") for i in range(1, 5)):  # ResNet (timm or torchvision)
        act = getattr(model, "act1", None) or getattr(model, "relu", None)
        pool = getattr(model, "global_pool", None) or getattr(model, "avgpool", None)
        return Stages(seq(model.conv1, model.bn1, act, model.maxpool),
                      [model.layer1, model.layer2, model.layer3, model.layer4], seq(pool, flat))
    if hasattr(model, "stem") and hasattr(model, "stages") and hasattr(model, "forward_head"):  # timm stages
        class Tail(nn.Module):
            def __init__(self, m):
                super().__init__()
                self.norm_pre = getattr(m, "norm_pre", nn.Identity())
                self.m = m

            def forward(self, x):
                return self.m.forward_head(self.norm_pre(x), pre_logits=True)

        return Stages(model.stem, list(model.stages), Tail(model))
    if hasattr(model, "features") and isinstance(model.features, nn.Sequential) and hasattr(model, "avgpool"):
        feats = list(model.features)  # torchvision MobileNet/EfficientNet: first conv, blocks…, last conv
        return Stages(feats[0], feats[1:-1], seq(feats[-1], model.avgpool, flat, getattr(model, "classifier", None)))
    raise CutError(f"no known cut points for {type(model).__name__}: --unfreeze works with EfficientNet, "
                   "MobileNet, ResNet and timm stage models; use --unfreeze 0 (head only) or all")


def verified_stages(backbone) -> Stages:
    """`stages`, checked: stem → blocks → tail equals the backbone on a random input."""
    import torch

    st = stages(backbone.model)
    h, w = backbone.spec.input_size
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = backbone.model.eval()(x)
        y = st.stem(x)
        for b in st.blocks:
            y = b(y)
        got = st.tail(y)
    if got.shape != ref.shape or float((got - ref).abs().max()) > 1e-4:
        raise CutError(f"cutting {backbone.name} into blocks does not reproduce it; use --unfreeze 0 or all")
    return st


def cut_index(st: Stages, unfreeze: int, name: str) -> int:
    n = len(st.blocks)
    if not 1 <= unfreeze <= n:
        raise CutError(f"--unfreeze {unfreeze}: {name} has {n} blocks; use 0..{n} or all")
    return n - unfreeze


def trunk_module(backbone, st: Stages, k: int):
    """uint8 NHWC image → normalise → stem → blocks[:k] → activation map (frozen)."""
    import torch

    from edgetl.export.torch_onnx import image_module

    return image_module(dataclasses.replace(backbone, model=torch.nn.Sequential(st.stem, *st.blocks[:k]))).eval()


def top_and_head(st: Stages, k: int, head):
    """activation → blocks[k:] → tail → head logits: the trainable part."""
    import torch

    class Top(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.Sequential(*st.blocks[k:])
            self.tail = st.tail
            self.head = head

        def forward(self, activation):
            return self.head(self.tail(self.blocks(activation)))

    return Top()


def trunk_fingerprint(backbone_fp: str, k: int, n_blocks: int) -> str:
    return hashlib.sha256(f"{backbone_fp}|cut{k}/{n_blocks}".encode()).hexdigest()[:32]


def export_trunk(backbone, st: Stages, k: int, atol: float = C.EXPORT_ATOL):
    """The frozen trunk as a checked onnx.ModelProto: image → activation [N, C, h, w]."""
    import torch

    from edgetl import __version__
    from edgetl.data.preprocess import load_image
    from edgetl.deploy.runtime import session
    from edgetl.export.torch_onnx import check_batches, check_parity, default_check_images, to_onnx

    module = trunk_module(backbone, st, k)
    h, w = backbone.spec.input_size
    with torch.no_grad():
        shape = list(module(torch.zeros(1, h, w, 3, dtype=torch.uint8)).shape[1:])
    cut = json.dumps({"unfreeze": len(st.blocks) - k, "block": k, "blocks": len(st.blocks), "shape": shape})
    meta = {C.KEY_FORMAT: C.FORMAT_TRUNK, C.KEY_VERSION: __version__, C.KEY_BACKBONE: backbone.name,
            C.KEY_WEIGHTS_SHA256: backbone.weights_sha256,
            C.KEY_FINGERPRINT: trunk_fingerprint(backbone.fingerprint, k, len(st.blocks)),
            C.KEY_EMBEDDING_DIM: str(int(np.prod(shape))), C.KEY_PREPROCESS: backbone.spec.to_json(), C.KEY_CUT: cut}
    model = to_onnx(module, (torch.zeros(2, h, w, 3, dtype=torch.uint8),), [C.IMAGE], [C.ACTIVATION], meta)
    batches = check_batches([load_image(p, backbone.spec) for p in default_check_images()])
    check_parity(module, session(model.SerializeToString(), "cpu"), batches, C.IMAGE, "trunk", atol)
    return model, shape


def export_top(top, shape: list[int], classes: list[str], extra_meta: dict[str, str], atol: float = C.HEAD_ATOL):
    """Trained blocks + head as a checked onnx.ModelProto: activation → probabilities."""
    import torch

    from edgetl import __version__
    from edgetl.deploy.runtime import session
    from edgetl.export.torch_onnx import check_parity, to_onnx
    from edgetl.train.heads import with_softmax

    module = with_softmax(top)
    meta = {C.KEY_FORMAT: C.FORMAT_TOP, C.KEY_VERSION: __version__, C.KEY_CLASSES: json.dumps(classes), **extra_meta}
    model = to_onnx(module, (torch.zeros(2, *shape),), [C.ACTIVATION], [C.PROBABILITIES], meta)
    rng = np.random.default_rng(0)
    batches = [rng.uniform(0, 2, (n, *shape)).astype(np.float32) for n in (1, 3)]
    return model, check_parity(module, session(model.SerializeToString(), "cpu"), batches, C.ACTIVATION, "top", atol)


def freeze_bn(module, train_bn: bool):
    """BatchNorm layers keep their pretrained statistics unless train_bn (call after .train())."""
    import torch

    if not train_bn:
        for m in module.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()


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
    import copy
    import math
    import time

    import torch

    from edgetl.train.heads import Fit, balanced_accuracy, class_weights, loss_fn, val_criterion

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
    autocast = _autocast(device)
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
            with autocast():
                loss = loss_of(model(_layout(x)).float(), y)
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
            with torch.no_grad(), autocast():
                for x, y in val_x():
                    logits.append(judged(_layout(x.to(device, non_blocking=True))).float().cpu())
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
        import copy

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


def _autocast(device: str):
    """bf16 autocast on a GPU that has it (the weights stay float32); nothing on the CPU."""
    import contextlib

    import torch

    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def _layout(x):
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
        from edgetl.data.preprocess import augment_view, decode_bgr, load_image, read_regular

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
    import os

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

    from edgetl.data.pipeline import prefetch_map

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


def check_weights(backbone, meta: dict) -> None:
    if backbone.weights_sha256 != meta.get(C.KEY_WEIGHTS_SHA256):
        raise DataError(f"the backbone file was exported from other weights than {backbone.name}'s "
                        f"({backbone.source}); pass the same --weights FILE as for export-backbone")
