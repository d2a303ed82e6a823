"""Cutting a backbone for the "last N blocks" regime: its stages (stem, blocks, tail) found and verified,
the frozen trunk (blocks < k) exported to ONNX and checked, and the trained top (blocks >= k + head)
exported beside it. torch is imported by the functions that need it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np

from edgetl import __version__, backbones
from edgetl import contract as C
from edgetl.data.preprocess import load_image
from edgetl.errors import DataError
from edgetl.export.stages import CutError, Stages
from edgetl.export.torch_onnx import check_batches, check_parity, default_check_images, image_module, to_onnx, with_softmax
from edgetl.ort import session


def cut_index(st: Stages, unfreeze: int, name: str) -> int:
    n = len(st.blocks)
    if not 1 <= unfreeze <= n:
        raise CutError(f"--unfreeze {unfreeze}: {name} has {n} blocks; use 0..{n} or all")
    return n - unfreeze


def trunk_module(backbone, st: Stages, k: int):
    """uint8 NHWC image → normalise → stem → blocks[:k] → activation map (frozen)."""
    import torch


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


def check_weights(backbone, meta: dict) -> None:
    if backbone.weights_sha256 != meta.get(C.KEY_WEIGHTS_SHA256):
        raise DataError(f"the backbone file was exported from other weights than {backbone.name}'s "
                        f"({backbone.source}); pass the same --weights FILE as for export-backbone")


def torch_backbone(bmeta: dict, weights: str | None = None):
    """The PyTorch backbone that an exported backbone's metadata names, checked to be the same weights."""
    bb = backbones.get(bmeta[C.KEY_BACKBONE], weights)
    check_weights(bb, bmeta)
    return bb
