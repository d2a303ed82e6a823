"""Small pure functions on ONNX graphs, in the spirit of `onnx.compose`: load an edgetl artifact, read and
set its metadata, check it, keep one opset import per domain, fold the shape arithmetic of "same"
padding, drop dead nodes, sort nodes, hash bytes. Used by export, fuse, quantize and training; they take
and return `onnx.ModelProto`s and write nothing. onnx itself is imported by the functions that need it.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgetl import contract as C
from edgetl.errors import ModelError


def check_model(model) -> None:
    """The structural check every artifact passes before it is written: the ONNX checker (with shape
    inference), and each opset domain imported once ("" and "ai.onnx" being one domain; a repeated
    domain makes onnxruntime's quantizer fail with "Failed to find proper ai.onnx domain").
    Raises ModelError for a repeated domain, onnx's ValidationError for the rest.
    """
    import onnx

    seen: dict[str, int] = {}
    for o in model.opset_import:
        domain = o.domain or "ai.onnx"
        if domain in seen:
            raise ModelError(f"the model imports opset domain {domain!r} twice (versions {seen[domain]} and "
                             f"{o.version}); nothing written")
        seen[domain] = o.version
    onnx.checker.check_model(model, full_check=True)


def dedupe_opsets(model) -> None:
    """Keep one opset import per domain, in place (onnx.compose.merge_models repeats the default
    domain). Raises ModelError when one domain is imported at two versions."""
    kept: dict[str, object] = {}
    for o in model.opset_import:
        domain = o.domain or "ai.onnx"
        if domain in kept and kept[domain].version != o.version:
            raise ModelError(f"the models import opset domain {domain!r} at versions {kept[domain].version} "
                             f"and {o.version}")
        kept.setdefault(domain, o)
    unique = [(o.domain, o.version) for o in kept.values()]
    del model.opset_import[:]
    for domain, version in unique:
        model.opset_import.add(domain=domain, version=version)


def set_metadata(model, metadata: dict[str, str]) -> None:
    existing = {p.key: p for p in model.metadata_props}
    for key, value in metadata.items():
        if key in existing:
            existing[key].value = str(value)
        else:
            model.metadata_props.add(key=key, value=str(value))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def metadata(model) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def load(path, kind: str | tuple[str, ...]):
    """Load an ONNX file and check it is the edgetl artifact `kind` (or one of several); ModelError otherwise."""
    import onnx

    p = Path(path)
    if not p.is_file():
        raise ModelError(f"not found: {p}")
    try:
        m = onnx.load(str(p))
    except Exception:
        raise ModelError(f"{p} is not an ONNX model") from None
    kinds = (kind,) if isinstance(kind, str) else kind
    if metadata(m).get(C.KEY_FORMAT) not in kinds:
        raise ModelError(f"{p} is not an edgetl {' or '.join(kinds)}")
    return m


def prepare(model):
    """A float model ready for int8/fp16 conversion, with the same outputs.

    One opset import per domain; the shape arithmetic of TF-style "same" padding (Shape → Gather →
    ... → Pad, recomputed at run time) folded into constants, since only the batch size varies;
    dead nodes dropped; onnxruntime's basic (hardware-independent) optimisations applied, which then
    merge each constant Pad into its Conv. Unfolded, the quantizer would quantize the padding
    arithmetic itself and leave float Pads between int8 convolutions.
    """
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    dedupe_opsets(m)
    for _ in range(32):  # each pass makes the next padding's input shape known
        folded = fold_shape_gathers(m)
        m = ort_basic(m)
        if not folded:
            break
    drop_dead_nodes(m)
    prune_opsets(m)
    return m


def fold_shape_gathers(model) -> int:
    """Replace Gather(Shape(x), i) by a constant where dimension i of x is known. Returns how many."""
    import onnx
    from onnx import helper, numpy_helper

    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    shapes = {vi.name: [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
              for vi in (*g.value_info, *g.input, *g.output)}
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    dims_of = {}
    for n in model.graph.node:
        if n.op_type == "Shape" and n.input[0] in shapes:
            a = {x.name: x.i for x in n.attribute}
            dims = shapes[n.input[0]]
            dims_of[n.output[0]] = dims[a.get("start", 0):a.get("end", len(dims))]
    nodes, folded = [], 0
    for n in model.graph.node:
        axis = next((x.i for x in n.attribute if x.name == "axis"), 0)
        if n.op_type == "Gather" and n.input[0] in dims_of and n.input[1] in consts and axis == 0:
            idx, dims = consts[n.input[1]], dims_of[n.input[0]]
            vals = [dims[int(i)] if -len(dims) <= int(i) < len(dims) else None for i in np.ravel(idx)]
            if vals and all(v for v in vals):
                value = numpy_helper.from_array(np.array(vals, dtype=np.int64).reshape(idx.shape))
                nodes.append(helper.make_node("Constant", [], [n.output[0]], name=f"{n.name}/folded", value=value))
                folded += 1
                continue
        nodes.append(n)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return folded


def ort_basic(model):
    """onnxruntime's basic graph optimisations (constant folding, Pad+Conv...), offline."""
    import onnx

    with tempfile.TemporaryDirectory(prefix="edgetl-prep-") as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        onnx.save(model, str(src))
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(dst)
        so.log_severity_level = 3
        ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
        return onnx.load(str(dst))


def drop_dead_nodes(model) -> None:
    """Remove nodes whose outputs nobody reads, and initializers no node reads."""
    g = model.graph
    while True:
        used = {o.name for o in g.output} | {i for n in g.node for i in n.input}
        live = [n for n in g.node if any(o in used for o in n.output)]
        if len(live) == len(g.node):
            break
        del g.node[:]
        g.node.extend(live)
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)


def prune_opsets(model) -> None:
    """Keep the opset imports of domains that nodes use (onnxruntime's optimiser adds all it knows)."""
    used = {n.domain or "" for n in model.graph.node} | {""}
    keep = [(o.domain, o.version) for o in model.opset_import if (o.domain or "") in used or o.domain == "ai.onnx"]
    del model.opset_import[:]
    for d, v in keep:
        model.opset_import.add(domain=d, version=v)


def toposort(model) -> None:
    """Order the graph's nodes so that each comes after the producers of its inputs (stable)."""
    g = model.graph
    ready = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    pending, ordered = list(g.node), []
    while pending:
        rest = []
        for n in pending:
            if all(i in ready for i in n.input):
                ordered.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise ModelError("the converted graph has a cycle or a missing input; nothing written")
        pending = rest
    nodes = [type(n)() for n in ordered]
    for new, old in zip(nodes, ordered):
        new.CopyFrom(old)
    del g.node[:]
    g.node.extend(nodes)
