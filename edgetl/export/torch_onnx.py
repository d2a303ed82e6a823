"""PyTorch → ONNX with parity checks: every artifact is verified before it is written."""

from __future__ import annotations

import dataclasses
import io
import os
import warnings
from pathlib import Path

import numpy as np

from edgetl import __version__
from edgetl import contract as C
from edgetl.data.preprocess import load_image
from edgetl.errors import ParityError
from edgetl.export.graph import check_model, prepare, set_metadata, sha256_bytes
from edgetl.files import writable_dir, write_bytes
from edgetl.ort import session
from edgetl.spec import Spec


def image_module(backbone):
    """Wrap a Backbone: uint8 NHWC RGB → cast, scale, normalise, NCHW → pooled embedding."""
    import torch

    class ImageToEmbedding(torch.nn.Module):
        def __init__(self, features, spec: Spec):
            super().__init__()
            self.features = features
            mean = torch.tensor(spec.mean, dtype=torch.float32)
            std = torch.tensor(spec.std, dtype=torch.float32)
            # (x/255 - mean)/std as one multiply-add
            self.register_buffer("scale", (1.0 / (255.0 * std)).view(1, 3, 1, 1))
            self.register_buffer("shift", (-mean / std).view(1, 3, 1, 1))

        def forward(self, image):
            x = image.permute(0, 3, 1, 2).to(torch.float32)
            return self.features(x * self.scale + self.shift)

    return ImageToEmbedding(backbone.model, backbone.spec).eval()


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


def to_onnx(module, example, input_names, output_names, metadata: dict[str, str]):
    """Export `module` (eval mode) with a dynamic batch axis; returns the checked onnx.ModelProto."""
    import onnx
    import torch

    buf = io.BytesIO()
    dynamic = {n: {0: C.BATCH_AXIS} for n in (*input_names, *output_names)}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, example, buf, input_names=list(input_names), output_names=list(output_names),
                          dynamic_axes=dynamic, opset_version=C.OPSET, dynamo=False, do_constant_folding=True)
    model = onnx.load_from_string(buf.getvalue())
    if input_names[0] == C.IMAGE:  # only the batch varies: fold the shape arithmetic of "same" padding

        model = prepare(model)  # ~600 nodes → ~100 for EfficientNet-Lite0, same outputs, no shape ops on the CPU
    model.ir_version = C.IR_VERSION
    model.producer_name = "edgetl"
    model.producer_version = __version__
    set_metadata(model, metadata)
    check_model(model)
    return model


def max_abs_diff(a: np.ndarray, b: np.ndarray, what: str) -> float:
    if a.shape != b.shape:
        raise ParityError(f"{what}: output shape {a.shape} differs from the reference {b.shape}")
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0


def check_parity(module, sess, batches, input_name: str, what: str, atol: float) -> float:
    """Run `module` (PyTorch) and `sess` (onnxruntime) on each batch; the max abs difference.

    Raises ParityError (nothing gets written) when it exceeds `atol` or the shapes differ.
    """
    import torch

    worst = 0.0
    for batch in batches:
        with torch.no_grad():
            ref = module(torch.from_numpy(batch)).numpy()
        got = sess.run(None, {input_name: batch})[0]
        worst = max(worst, max_abs_diff(got, ref, f"{what} at batch {len(batch)}"))
    if not worst <= atol:
        raise ParityError(f"{what} export differs from PyTorch by {worst:.2e} (tolerance {atol:.0e}); nothing written")
    return worst


def default_check_images() -> list[str]:
    """Real photos available offline for the parity check: the ones matplotlib ships."""
    import matplotlib

    d = Path(matplotlib.get_data_path()) / "sample_data"
    return [str(d / n) for n in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png") if (d / n).exists()]


def check_batches(images: list[np.ndarray], sizes=(1, 3)) -> list[np.ndarray]:
    """Batches of the given sizes (other than the export batch, 2) drawn from `images`, with flips
    and crops so that a batch never repeats one picture."""
    pool = list(images)
    k = 0
    while len(pool) < max(sizes):
        base = images[k % len(images)]
        pool.append(np.ascontiguousarray(base[:, ::-1] if k % 2 == 0 else np.roll(base, 17 * (k + 1), axis=0)))
        k += 1
    return [np.stack(pool[:n]) for n in sizes]


@dataclasses.dataclass
class BackboneExport:
    path: Path
    name: str
    dim: int
    spec: Spec
    max_abs_diff: float
    sha256: str
    bytes: int


def export_backbone(backbone, out: str | os.PathLike, check_images: list[str] | None = None,
                    atol: float = C.EXPORT_ATOL) -> BackboneExport:
    """Export a Backbone to `out` as uint8 image → embedding, verified against PyTorch first.

    Raises ParityError when onnxruntime and PyTorch differ by more than `atol` on real photos at
    batch sizes 1 and 3 (the export uses batch 2); OutputError when `out` cannot be written.
    """
    import torch

    out = Path(out)
    writable_dir(out.parent)  # fail before the slow part
    module = image_module(backbone)
    h, w = backbone.spec.input_size
    example = torch.zeros((2, h, w, 3), dtype=torch.uint8)
    meta = {
        C.KEY_FORMAT: C.FORMAT_BACKBONE, C.KEY_VERSION: __version__, C.KEY_BACKBONE: backbone.name,
        C.KEY_WEIGHTS_SHA256: backbone.weights_sha256, C.KEY_FINGERPRINT: backbone.fingerprint,
        C.KEY_EMBEDDING_DIM: str(backbone.dim), C.KEY_PREPROCESS: backbone.spec.to_json(),
    }
    model = to_onnx(module, (example,), [C.IMAGE], [C.EMBEDDING], meta)
    data = model.SerializeToString()
    images = [load_image(p, backbone.spec) for p in (check_images or default_check_images())]
    worst = check_parity(module, session(data, "cpu"), check_batches(images), C.IMAGE, "backbone", atol)
    write_bytes(out, data)
    return BackboneExport(out, backbone.name, backbone.dim, backbone.spec, worst, sha256_bytes(data), len(data))
