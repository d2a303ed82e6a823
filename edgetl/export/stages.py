"""The structure of a feature extractor: stem → blocks → tail, found for the common architectures and
verified to reproduce the network. The "last N blocks" regime cuts it (train/cut.py); the multi-depth
export taps every block's output (export/depths.py). torch is imported by the functions that need it.

Cut points exist for timm EfficientNet/MobileNet (`blocks`), ResNet (`layer1..4`), timm `stages` models
(ConvNeXt, …) and torchvision `features` models (MobileNet, EfficientNet).
"""

from __future__ import annotations

import dataclasses

from edgetl.errors import EdgetlError


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
