"""Features from every depth of a frozen backbone (Head-to-Toe): one pass of the network, the output of
each block globally average-pooled, concatenated with the usual embedding.

The multi-depth backbone is an ordinary edgetl backbone artifact (image uint8 → embedding float32
[N, D]) with its own fingerprint, so `embed` caches its rows like any other and a head on any subset of
depths costs no re-embedding; `KEY_DEPTHS` in its metadata says which columns hold which depth.
Exported and checked against PyTorch like every backbone. torch is imported by the functions that need it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from edgetl import __version__
from edgetl import contract as C
from edgetl.data.preprocess import load_image
from edgetl.errors import ModelError
from edgetl.export.graph import sha256_bytes
from edgetl.export.stages import verified_stages
from edgetl.export.torch_onnx import BackboneExport, check_batches, check_parity, default_check_images, image_module, to_onnx
from edgetl.files import writable_dir, write_bytes
from edgetl.ort import session

FEATURES = ("last", "multi")
MULTI_VERSION = "multi-depth/gap/v1"  # bump when the multi-depth graph changes meaning (new cache namespace)


def multi_module(backbone):
    """normalised float NCHW → [GAP(block 1) … GAP(block n), embedding]: one pass through the network."""
    import torch

    st = verified_stages(backbone)

    class MultiDepth(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = st.stem
            self.blocks = torch.nn.ModuleList(st.blocks)
            self.tail = st.tail

        def forward(self, x):
            x = self.stem(x)
            pooled = []
            for b in self.blocks:
                x = b(x)
                pooled.append(x.mean(dim=(2, 3)))
            return torch.cat([*pooled, self.tail(x)], dim=1)

    return MultiDepth().eval()


def layout(module, spec) -> list[dict]:
    """[{"name", "start", "dim"}] of each depth's columns (blocks first, "last" = the usual embedding)."""
    import torch

    h, w = spec.input_size
    with torch.no_grad():
        x = module.stem(torch.zeros(1, 3, h, w))
        dims = []
        for b in module.blocks:
            x = b(x)
            dims.append(int(x.shape[1]))
        dims.append(int(module.tail(x).shape[1]))
    names = [f"block{i + 1}" for i in range(len(dims) - 1)] + ["last"]
    starts = np.cumsum([0] + dims[:-1]).tolist()
    return [{"name": n, "start": int(s), "dim": d} for n, s, d in zip(names, starts, dims)]


def fingerprint(backbone) -> str:
    return hashlib.sha256(f"{backbone.fingerprint}|{MULTI_VERSION}".encode()).hexdigest()[:32]


def export_multi(backbone, out: str | os.PathLike, check_images: list[str] | None = None,
                 atol: float = C.EXPORT_ATOL) -> BackboneExport:
    """Export the multi-depth backbone to `out`, verified against PyTorch at batch 1 and 3 first."""
    import torch

    out = Path(out)
    writable_dir(out.parent)
    features = multi_module(backbone)
    depths = layout(features, backbone.spec)
    dim = depths[-1]["start"] + depths[-1]["dim"]
    module = image_module(dataclasses.replace(backbone, model=features))
    h, w = backbone.spec.input_size
    meta = {C.KEY_FORMAT: C.FORMAT_BACKBONE, C.KEY_VERSION: __version__, C.KEY_BACKBONE: backbone.name,
            C.KEY_WEIGHTS_SHA256: backbone.weights_sha256, C.KEY_FINGERPRINT: fingerprint(backbone),
            C.KEY_EMBEDDING_DIM: str(dim), C.KEY_PREPROCESS: backbone.spec.to_json(),
            C.KEY_DEPTHS: json.dumps(depths)}
    model = to_onnx(module, (torch.zeros((2, h, w, 3), dtype=torch.uint8),), [C.IMAGE], [C.EMBEDDING], meta)
    data = model.SerializeToString()
    images = [load_image(p, backbone.spec) for p in (check_images or default_check_images())]
    worst = check_parity(module, session(data, "cpu"), check_batches(images), C.IMAGE, "multi-depth backbone", atol)
    write_bytes(out, data)
    return BackboneExport(out, backbone.name, dim, backbone.spec, worst, sha256_bytes(data), len(data))


def read_layout(meta: dict[str, str], dim: int, path) -> list[dict]:
    """The depth layout a multi-depth backbone's metadata states, checked against its embedding size."""
    try:
        depths = json.loads(meta[C.KEY_DEPTHS])
        ok = (isinstance(depths, list) and depths and all(
            isinstance(d, dict) and isinstance(d.get("name"), str) and isinstance(d.get("start"), int)
            and isinstance(d.get("dim"), int) and d["dim"] > 0 for d in depths))
    except KeyError:
        raise ModelError(f"{path} is not a multi-depth backbone (export one with `edgetl train-head --features "
                         "multi`)") from None
    except (ValueError, RecursionError):
        ok = False
    if not ok or [d["start"] for d in depths] != np.cumsum([0] + [d["dim"] for d in depths[:-1]]).tolist() or \
            depths[-1]["start"] + depths[-1]["dim"] != dim:
        raise ModelError(f"{path}: its depth layout does not match its embedding size {dim}")
    return depths
