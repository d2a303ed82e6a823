"""Head export and fusion: backbone.onnx + head.onnx → one model.onnx (uint8 image → probabilities).

Both sides are exported with the contract's opset and IR version, so `onnx.compose.merge_models`
accepts them; the fused model is checked against the chained pair before it is written.
"""

from __future__ import annotations

import json

import numpy as np

from edgetl import __version__
from edgetl import contract as C
from edgetl.data.preprocess import load_image
from edgetl.errors import ModelError, ParityError
from edgetl.export.graph import check_model, dedupe_opsets, load, metadata, set_metadata, sha256_bytes
from edgetl.export.torch_onnx import check_batches, check_parity, default_check_images, max_abs_diff, to_onnx, with_softmax
from edgetl.files import write_bytes
from edgetl.ort import session
from edgetl.spec import Spec


def export_head(head, dim: int, classes: list[str], extra_meta: dict[str, str], atol: float = C.HEAD_ATOL):
    """A trained head (logits) → checked onnx.ModelProto: embedding[N,D] → probabilities[N,C].

    Checked against PyTorch on random embeddings at batch sizes 1 and 3 (exported at 2).
    """
    import torch

    module = with_softmax(head)
    meta = {C.KEY_FORMAT: C.FORMAT_HEAD, C.KEY_VERSION: __version__, C.KEY_CLASSES: json.dumps(classes),
            **extra_meta}
    model = to_onnx(module, (torch.zeros(2, dim),), [C.EMBEDDING], [C.PROBABILITIES], meta)
    rng = np.random.default_rng(0)
    batches = [rng.uniform(0, 4, (n, dim)).astype(np.float32) for n in (1, 3)]
    return model, check_parity(module, session(model.SerializeToString(), "cpu"), batches, C.EMBEDDING, "head", atol)


def fuse(backbone, head):
    """Merge two onnx.ModelProto (backbone, head) into one: image → probabilities, metadata combined."""
    import onnx
    from onnx import compose

    bm, hm = metadata(backbone), metadata(head)
    pairs = {C.FORMAT_BACKBONE: C.FORMAT_HEAD, C.FORMAT_TRUNK: C.FORMAT_TOP}
    if bm.get(C.KEY_FORMAT) not in pairs:
        raise ModelError("the first model is not an edgetl backbone or trunk")
    if hm.get(C.KEY_FORMAT) != pairs[bm[C.KEY_FORMAT]]:
        raise ModelError(f"the second model is not an edgetl {pairs[bm[C.KEY_FORMAT]]} (it must follow the "
                         f"{bm[C.KEY_FORMAT]})")
    if hm.get(C.KEY_CUT, bm.get(C.KEY_CUT)) != bm.get(C.KEY_CUT):
        raise ModelError("the top was trained for another cut point than this trunk")
    if hm.get(C.KEY_FINGERPRINT) and hm[C.KEY_FINGERPRINT] != bm[C.KEY_FINGERPRINT]:
        raise ModelError(f"the head was trained on another backbone ({hm.get(C.KEY_BACKBONE)}, "
                         f"fingerprint {hm[C.KEY_FINGERPRINT][:12]}) than this one ({bm[C.KEY_BACKBONE]}, "
                         f"{bm[C.KEY_FINGERPRINT][:12]})")
    link = backbone.graph.output[0].name
    dims_b = [d.dim_value for d in backbone.graph.output[0].type.tensor_type.shape.dim][1:]
    dims_h = [d.dim_value for d in head.graph.input[0].type.tensor_type.shape.dim][1:]
    known = all(a == b for a, b in zip(dims_b, dims_h) if a and b)  # 0: a size only known at run time
    if len(dims_b) != len(dims_h) or not known or head.graph.input[0].name != link:
        raise ModelError(f"the models do not connect: {link}{dims_b} → {head.graph.input[0].name}{dims_h}")
    b, h = onnx.ModelProto(), onnx.ModelProto()
    b.CopyFrom(backbone)
    h.CopyFrom(head)
    del b.metadata_props[:], h.metadata_props[:]  # merged below, by rule rather than by compose
    fused = compose.merge_models(b, h, io_map=[(link, link)], prefix2="head/",
                                 producer_name="edgetl", producer_version=__version__)
    # merge_models prefixes the head's output name too; restore the contract's name.
    out = fused.graph.output[0]
    for node in fused.graph.node:
        node.output[:] = [C.PROBABILITIES if o == out.name else o for o in node.output]
    out.name = C.PROBABILITIES
    dedupe_opsets(fused)  # merge_models lists the default domain once per side
    del fused.metadata_props[:]
    meta = {k: v for k, v in bm.items() if k != C.KEY_FORMAT}
    meta.update({k: v for k, v in hm.items() if k != C.KEY_FORMAT})
    meta.update({C.KEY_FORMAT: C.FORMAT_MODEL, C.KEY_VERSION: __version__,
                 C.KEY_BACKBONE_SHA256: sha256_bytes(backbone.SerializeToString()),
                 C.KEY_HEAD_SHA256: sha256_bytes(head.SerializeToString())})
    set_metadata(fused, meta)
    fused.ir_version = C.IR_VERSION
    check_model(fused)
    return fused


def check_fused(fused, backbone, head, batches, atol: float = C.FUSE_ATOL) -> tuple[float, int, list[np.ndarray]]:
    """Run fused and backbone-then-head on the same uint8 batches (any iterable); ParityError beyond `atol`.

    Returns (max abs diff, images checked, the fused probabilities per batch).
    """
    sf, sb, sh = (session(m.SerializeToString(), "cpu") for m in (fused, backbone, head))
    link = backbone.graph.output[0].name
    worst, n, outs = 0.0, 0, []
    for batch in batches:
        n += len(batch)
        got = sf.run([C.PROBABILITIES], {C.IMAGE: batch})[0]
        emb = sb.run([link], {C.IMAGE: batch})[0]
        ref = sh.run([C.PROBABILITIES], {link: emb})[0]
        worst = max(worst, max_abs_diff(got, ref, f"fused model at batch {len(batch)}"))
        outs.append(got)
    if not worst <= atol:
        raise ParityError(f"fused model differs from backbone-then-head by {worst:.2e} (tolerance {atol:.0e}); "
                          "nothing written")
    return worst, n, outs


def fuse_files(first_path, second_path, out, check_images: list[str] | None = None) -> tuple[float, int]:
    """`edgetl fuse`: backbone+head (or trunk+top) files → a checked model file. (max abs diff, images)."""
    first = load(first_path, (C.FORMAT_BACKBONE, C.FORMAT_TRUNK))
    second = load(second_path, C.FORMAT_TOP if metadata(first).get(C.KEY_FORMAT) == C.FORMAT_TRUNK else C.FORMAT_HEAD)
    fused = fuse(first, second)
    spec = Spec.from_json(metadata(first)[C.KEY_PREPROCESS])
    images = [load_image(p, spec) for p in (check_images or default_check_images())]
    worst, n, _ = check_fused(fused, first, second, check_batches(images))
    write_bytes(out, fused.SerializeToString())
    return worst, n

