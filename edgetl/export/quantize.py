"""int8 and fp16 copies of a fused model.onnx, returned only when measured faster and no worse.

int8: onnxruntime static quantization (QDQ; int8 weights per channel, uint8 activations) calibrated
on training photos of the model's data, read through `load_image` so that the pixels are the ones
deployment sees. fp16: onnxruntime's float16 converter. Both keep the uint8 image input, the
in-graph normalisation in float and the float32 probabilities output.

Before anything is returned, the gate on the validation photos of the same data: accuracy vs the
float32 model (a drop above `max_drop` is refused; for int8, keeping the most sensitive nodes in
float is tried first), top-1 agreement, and batch-1 latency interleaved with the float32 model
(not faster is refused unless `force`). `quantize_model` writes nothing; `write_quantized` writes
atomically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from edgetl import __version__
from edgetl import contract as C
from edgetl.errors import DataError, GateRefused, ModelError, OutputError, ParityError

PRECISIONS = ("int8", "fp16")
CALIBRATIONS = ("minmax", "percentile", "entropy")
MIN_SPEEDUP = 1.05  # "faster" means at least this ratio of medians (two-core machines are noisy)
GATE_ROUNDS = 100  # interleaved batch-1 runs per model, at most (GATE_BUDGET_S bounds the time)
GATE_BUDGET_S = 10.0
_IN_MEMORY_BYTES = 1 << 30  # validation images kept decoded up to this size, else decoded again per pass


@dataclasses.dataclass
class QuantResult:
    """A model that passed the gate (or was forced through its speed test): bytes and figures."""

    data: bytes
    precision: str
    summary: dict  # JSON-ready: accuracies, drop, agreement, latencies, speed-up, calibration, attempts

    def line(self) -> str:
        """One line for a user: both accuracies, agreement, latencies, speed-up."""
        return gate_line(self.summary)


def gate_line(s: dict) -> str:
    p, lat = s["precision"], s.get("latency")
    text = (f"val accuracy {p} {s[p]['accuracy']:.4f} vs float32 {s['float32']['accuracy']:.4f} "
            f"({'drop' if s['accuracy_drop'] >= 0 else 'gain'} {100 * abs(s['accuracy_drop']):.1f} points), "
            f"top-1 agreement {100 * s['agreement']:.1f} %")
    if lat:
        text += (f"; batch 1 on {lat['provider']}: {lat[p + '_ms']:.2f} ms vs {lat['float32_ms']:.2f} ms "
                 f"({lat['speedup']:.2f}x)")
    return text


def default_output(model_path, precision: str) -> Path:
    """model.onnx → model.int8.onnx / model.fp16.onnx, beside it."""
    p = Path(model_path)
    stem = p.name[:-5] if p.name.endswith(".onnx") else p.name
    return p.with_name(f"{stem}.{precision}.onnx")


def cpu_has_vnni() -> bool | None:
    """True/False when /proc/cpuinfo says whether the CPU has 8-bit dot products (VNNI); None when unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    except OSError:
        pass
    return None


def default_reduce_range() -> bool:
    """onnxruntime's advice for QDQ on CPUs: 7-bit weights on x86-64 without VNNI (u8s8 products can
    saturate there), full 8 bits with VNNI and on ARM. Measured here by scripts/bench_quantize.py."""
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
    return x86 and cpu_has_vnni() is not True


# ---------------------------------------------------------------------------------------------------
# Preparing the float graph


def prepare(model):
    """A float model ready for int8/fp16 conversion, with the same outputs.

    One opset import per domain; the shape arithmetic of TF-style "same" padding (Shape → Gather →
    ... → Pad, recomputed at run time) folded into constants, since only the batch size varies;
    dead nodes dropped; onnxruntime's basic (hardware-independent) optimisations applied, which then
    merge each constant Pad into its Conv. Unfolded, the quantizer would quantize the padding
    arithmetic itself and leave float Pads between int8 convolutions.
    """
    import onnx

    from edgetl.export.torch_onnx import dedupe_opsets

    m = onnx.ModelProto()
    m.CopyFrom(model)
    dedupe_opsets(m)
    for _ in range(32):  # each pass makes the next padding's input shape known
        folded = _fold_shape_gathers(m)
        m = _ort_basic(m)
        if not folded:
            break
    _drop_dead_nodes(m)
    _prune_opsets(m)
    return m


def _fold_shape_gathers(model) -> int:
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


def _ort_basic(model):
    """onnxruntime's basic graph optimisations (constant folding, Pad+Conv...), offline."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="edgetl-prep-") as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        onnx.save(model, str(src))
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(dst)
        so.log_severity_level = 3
        ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
        return onnx.load(str(dst))


def _drop_dead_nodes(model) -> None:
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


def _prune_opsets(model) -> None:
    """Keep the opset imports of domains that nodes use (onnxruntime's optimiser adds all it knows)."""
    used = {n.domain or "" for n in model.graph.node} | {""}
    keep = [(o.domain, o.version) for o in model.opset_import if (o.domain or "") in used or o.domain == "ai.onnx"]
    del model.opset_import[:]
    for d, v in keep:
        model.opset_import.add(domain=d, version=v)


def _input_chain(model) -> list[str]:
    """The nodes between the uint8 image and the first convolution (transpose, cast, normalisation)."""
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    chain, frontier = [], [C.IMAGE]
    while frontier:
        t = frontier.pop()
        for n in consumers.get(t, []):
            if n.op_type in ("Transpose", "Cast", "Mul", "Add", "Sub", "Div") and n.name not in chain:
                chain.append(n.name)
                frontier.extend(n.output)
    return chain


def float_plans(model) -> list[tuple[str, list[str]]]:
    """Which nodes int8 keeps in float, in the order tried: [(label, node names)].

    First: the first convolution and the trained head ("head/" nodes of the fused model). Measured
    on EfficientNet-Lite0 (scripts/bench_quantize.py), this is both faster than quantizing them (an
    int8 convolution over 3 input channels, after quantizing the image, is slow: 2.4x vs 1.9x over
    float32 at batch 1) and as accurate. When the gate fails: also every depthwise convolution (the
    kind known to lose most in EfficientNet and MobileNet).
    """
    nodes = list(model.graph.node)
    convs = [n for n in nodes if n.op_type == "Conv"]
    stem = [convs[0].name] if convs else []
    head = [n.name for n in nodes if n.name.startswith("head/") and n.op_type in ("Gemm", "MatMul", "Conv")]
    dw = [n.name for n in convs[1:] if any(a.name == "group" and a.i > 1 for a in n.attribute)]
    what = " and ".join(w for w, names in (("the first conv", stem), ("the head", head)) if names) or "nothing"
    plans = [(what, stem + head)]
    if dw:
        plans.append((f"{what.replace(' and ', ', ')} and {len(dw)} depthwise convs", stem + head + dw))
    return plans


# ---------------------------------------------------------------------------------------------------
# Images


class _Images:
    """Labelled photos decoded with `load_image`: kept in memory when small, else decoded per pass."""

    def __init__(self, items, spec, classes: list[str], batch_size: int = 32):
        self.items, self.spec, self.batch_size = items, spec, batch_size
        self.labels_of = {it.path: classes.index(it.label) for it in items}
        h, w = spec.input_size
        self._cache = [] if len(items) * h * w * 3 <= _IN_MEMORY_BYTES else None
        self.skipped: list = []
        self._filled = False

    def batches(self):
        """Yield (uint8 [n,H,W,3], labels int [n])."""
        if self._filled:
            yield from self._cache
            return
        from edgetl.data.pipeline import image_batches

        skipped = []
        for paths, batch, errors in image_batches([it.path for it in self.items], self.spec, self.batch_size):
            skipped += errors
            if batch is not None:
                b = (batch, np.array([self.labels_of[p] for p in paths]))
                if self._cache is not None:
                    self._cache.append(b)
                yield b
        self.skipped = skipped
        self._filled = self._cache is not None


def calibration_images(items, spec, n: int, seed: int = 0) -> tuple[list[np.ndarray], int]:
    """Up to n decoded training photos, classes taking turns (each shuffled, seeded). (images, skipped)."""
    from edgetl.data.pipeline import image_batches

    rng = np.random.default_rng(seed)
    by_class: dict[str, list] = {}
    for it in items:
        by_class.setdefault(it.label, []).append(it.path)
    queues = [list(np.array(v, dtype=object)[rng.permutation(len(v))]) for _, v in sorted(by_class.items())]
    order = [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]
    out, skipped = [], 0
    for _, batch, errors in image_batches(order[: 2 * n], spec, 32):
        skipped += len(errors)
        if batch is not None:
            out.extend(batch)
        if len(out) >= n:
            break
    return out[:n], skipped


class _Reader:
    """onnxruntime CalibrationDataReader over decoded images, in batches; `set_range` lets the
    calibrator collect one batch at a time (memory stays flat, for histogram methods too)."""

    def __init__(self, images: list[np.ndarray], batch: int = 8):
        self.batches = [np.stack(images[i:i + batch]) for i in range(0, len(images), batch)]
        self.set_range(0, len(self.batches))

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._it = iter(self.batches[start_index:end_index])

    def get_next(self):
        b = next(self._it, None)
        return None if b is None else {C.IMAGE: b}


@contextlib.contextmanager
def _quiet():
    """onnxruntime's quantizer logs advice through the root logger, prints, and its sessions warn in C++."""
    import logging

    import onnxruntime as ort

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    ort.set_default_logger_severity(3)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print progress
            yield
    finally:
        root.setLevel(level)


# ---------------------------------------------------------------------------------------------------
# Converters


def _int8(prepared_path: Path, out_path: Path, images, calibration: str, reduce_range: bool, exclude: list[str],
          cache_path: Path):
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[calibration]
    with _quiet():
        quantize_static(str(prepared_path), str(out_path), _Reader(images), quant_format=QuantFormat.QDQ,
                        per_channel=True, reduce_range=reduce_range, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, nodes_to_exclude=exclude, calibrate_method=method,
                        calibration_cache_path=str(cache_path), extra_options={"CalibStridedMinMax": 1})
    return onnx.load(str(out_path))


def _fp16(prepared, exclude: list[str]):
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with _quiet():
        m = convert_float_to_float16(prepared, keep_io_types=True, node_block_list=exclude)
    _toposort(m)  # the converter appends the casts it adds at the end of the node list
    return m


def _toposort(model) -> None:
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


def _check_io(model, source) -> None:
    """The converted model keeps the contract: image uint8 [N,H,W,3] in, probabilities float32 [N,C] out."""
    from edgetl.export.torch_onnx import check_model

    def sig(m):
        return [(v.name, v.type.tensor_type.elem_type, [d.dim_value for d in v.type.tensor_type.shape.dim][1:])
                for v in (*m.graph.input, *m.graph.output)]

    if sig(model) != sig(source):
        raise ModelError(f"the converted model's inputs/outputs {sig(model)} differ from the float32 model's "
                         f"{sig(source)}; nothing written")
    check_model(model)


# ---------------------------------------------------------------------------------------------------
# The gate


def _predict(sess, images: _Images) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(predicted class, top probability, true label) per validation image."""
    pred, top, true = [], [], []
    for batch, labels in images.batches():
        p = sess.run([C.PROBABILITIES], {C.IMAGE: batch})[0]
        pred.append(p.argmax(1))
        top.append(p.max(1))
        true.append(labels)
    return np.concatenate(pred), np.concatenate(top), np.concatenate(true)


def _load_source(model, work: Path):
    """(proto, bytes, path on disk, display name) of the float32 model; ModelError when unusable."""
    import onnx

    from edgetl.export.fuse import load

    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        proto = load(path, C.FORMAT_MODEL)
        data, name = path.read_bytes(), str(path)
    else:
        proto = model if isinstance(model, onnx.ModelProto) else onnx.load_from_string(bytes(model))
        data, name = proto.SerializeToString(), "the model"
        path = work / "float32.onnx"
        path.write_bytes(data)
    meta = {p.key: p.value for p in proto.metadata_props}
    if meta.get(C.KEY_FORMAT) != C.FORMAT_MODEL:
        raise ModelError(f"{name} is not an edgetl model")
    if meta.get(C.KEY_PRECISION, "float32") != "float32":
        raise ModelError(f"{name} is already {meta[C.KEY_PRECISION]}; convert the float32 model it came from")
    return proto, data, path, name


def quantize_model(model, data, precision: str = "int8", max_drop: float = 0.01, calib_images: int = 200,
                   calibration: str = "minmax", reduce_range: bool | None = None, device: str | None = None,
                   threads: int | None = None, force: bool = False, min_speedup: float = MIN_SPEEDUP,
                   log: Callable[[str], None] | None = None) -> QuantResult:
    """An int8 or fp16 copy of a fused float32 model (path, onnx.ModelProto or bytes), gated on `data`.

    Calibration (int8) uses the training photos of `data` (select_split "train"), the gate its
    validation photos (select_split "val"). reduce_range None: `default_reduce_range()`. device
    None: cpu for int8, auto (CUDA when usable) for fp16. threads: onnxruntime's intra-op threads
    for the gate (None: its default). Writes nothing; `log` receives progress lines.

    Raises GateRefused (with .summary) when the accuracy drop exceeds `max_drop` (for int8, after
    keeping more nodes in float), or when the model is not `min_speedup` times faster at batch 1
    and not `force`; DataError when there are no calibration or validation photos; ModelError
    when the model is not a float32 edgetl model.
    """
    from edgetl.deploy.runtime import load_model, select_split, session
    from edgetl.export.torch_onnx import sha256_bytes
    from edgetl.quality.report import metrics

    log = log or (lambda line: None)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}")
    if calibration not in CALIBRATIONS:
        raise ValueError(f"calibration must be one of {CALIBRATIONS}")
    device = device or ("cpu" if precision == "int8" else "auto")
    rr = default_reduce_range() if reduce_range is None else bool(reduce_range)
    with tempfile.TemporaryDirectory(prefix="edgetl-quant-") as tmp:
        work = Path(tmp)
        source, source_bytes, source_path, name = _load_source(model, work)
        fm = load_model(source_path, "cpu")
        try:
            val = select_split(fm, data, "val")
        except DataError as e:
            raise DataError(f"no validation photos to check the {precision} model on ({e})") from None
        images = _Images(val.items, fm.spec, fm.classes)
        s_float = session(source_bytes, device, threads)
        provider = s_float.get_providers()[0]
        f_pred, _, y = _predict(s_float, images)
        if not len(y):
            raise DataError(f"none of the {len(val.items)} validation photos of {data} could be read")
        f_metrics = metrics(y, f_pred, fm.classes)
        log(f"float32: val accuracy {f_metrics['accuracy']:.4f} on {len(y)} photos ({val.note}), {provider}")

        x_check = next(images.batches())[0][:8]
        prepared = _checked_prepare(source, source_bytes, x_check, work / "prepared.onnx")
        always_float = _input_chain(prepared) + [n.name for n in prepared.graph.node if n.op_type == "Softmax"]
        calib, plans = None, [("nothing", [])]
        if precision == "int8":
            cal_images, calib = _calibration_set(fm, data, val, calib_images, calibration, rr, select_split)
            log(f"int8: calibrating on {calib['images']} training photos ({calibration}, "
                f"reduce_range {'on' if rr else 'off'}, per-channel weights)")
            plans = float_plans(prepared)

        summary = {
            "precision": precision, "source": name, "source_sha256": sha256_bytes(source_bytes), "data": str(data),
            "validation": {"images": int(len(y)), "split": val.note, "skipped": len(images.skipped)},
            "calibration": calib, "max_drop": max_drop, "attempts": [], "classes": fm.classes,
            "float32": _figures(f_metrics), "latency": None, "forced": False, "passed": False,
        }
        chosen = None
        for label, keep in plans:
            if precision == "int8":
                q = _int8(work / "prepared.onnx", work / "q.onnx", cal_images, calibration, rr, always_float + keep,
                          work / "calibration.json")
            else:
                q = _fp16(prepared, always_float)
            s_q = session(q.SerializeToString(), device, threads)
            q_pred, _, _ = _predict(s_q, images)
            q_metrics = metrics(y, q_pred, fm.classes)
            attempt = {"kept_float": label, "nodes_kept_float": len(keep), "accuracy": q_metrics["accuracy"],
                       "accuracy_drop": f_metrics["accuracy"] - q_metrics["accuracy"],
                       "agreement": float(np.mean(q_pred == f_pred))}
            summary["attempts"].append(attempt)
            summary.update({precision: _figures(q_metrics), "accuracy_drop": attempt["accuracy_drop"],
                            "agreement": attempt["agreement"]})
            log(f"{precision} (kept in float: {label}): {gate_line(summary)}")
            if attempt["accuracy_drop"] <= max_drop + 1e-12:
                chosen = (label, keep, q, s_q)
                break
        if chosen is None:
            tried = f", also with {plans[-1][0]} kept in float" if len(plans) > 1 else ""
            raise GateRefused(f"{precision} refused: val accuracy {summary[precision]['accuracy']:.4f} vs float32 "
                              f"{f_metrics['accuracy']:.4f} (drop {100 * summary['accuracy_drop']:.1f} points > "
                              f"--max-drop {100 * max_drop:.1f}){tried}; nothing written", summary)
        label, keep, q, s_q = chosen
        if calib is not None:
            calib["kept_float"] = {"what": label, "nodes": keep}

        lat = summary["latency"] = _latency(s_float, s_q, x_check[:1], precision, provider, threads, min_speedup)
        log(f"latency at batch 1 ({provider}, median of {lat['runs']} interleaved runs): float32 "
            f"{lat['float32_ms']:.2f} ms, {precision} {lat[precision + '_ms']:.2f} ms, {lat['speedup']:.2f}x")
        if lat["speedup"] < min_speedup:
            if not force:
                raise GateRefused(f"{precision} is not faster here: {lat[precision + '_ms']:.2f} ms vs float32 "
                                  f"{lat['float32_ms']:.2f} ms at batch 1 on {provider} ({lat['speedup']:.2f}x < "
                                  f"{min_speedup:.2f}x); nothing written (--force writes it anyway)", summary)
            summary["forced"] = True
        summary["passed"] = not summary["forced"]
        out = _with_metadata(q, source, summary)
        summary.update({"sha256": sha256_bytes(out), "bytes": len(out), "float32_bytes": len(source_bytes)})
        return QuantResult(out, precision, summary)


def _figures(m: dict) -> dict:
    return {k: m[k] for k in ("accuracy", "correct", "n", "confusion_matrix")}


def _checked_prepare(source, source_bytes: bytes, x: np.ndarray, path: Path):
    """`prepare(source)`, saved to `path`, after checking it gives the model's outputs on `x`."""
    import onnx

    from edgetl.deploy.runtime import session
    from edgetl.export.torch_onnx import max_abs_diff

    prepared = prepare(source)
    diff = max_abs_diff(session(prepared.SerializeToString(), "cpu").run(None, {C.IMAGE: x})[0],
                        session(source_bytes, "cpu").run(None, {C.IMAGE: x})[0], "prepared model")
    if not diff <= C.FUSE_ATOL:
        raise ParityError(f"the prepared float graph differs from the model by {diff:.2e} "
                          f"(tolerance {C.FUSE_ATOL:.0e}); nothing written")
    onnx.save(prepared, str(path))
    return prepared


def _calibration_set(fm, data, val, n: int, method: str, reduce_range: bool, select_split):
    """(decoded training photos, calibration summary); DataError without usable training photos."""
    try:
        cal = select_split(fm, data, "train")
    except DataError as e:
        raise DataError(f"no training photos to calibrate int8 on ({e})") from None
    overlap = {Path(it.path).resolve() for it in cal.items} & {Path(it.path).resolve() for it in val.items}
    if overlap:
        raise DataError(f"{len(overlap)} photos are in both the training and the validation split of {data}")
    images, skipped = calibration_images(cal.items, fm.spec, n)
    if not images:
        raise DataError(f"none of the training photos of {data} could be read for calibration")
    return images, {"method": method, "images": len(images), "skipped": skipped, "split": cal.note,
                    "reduce_range": reduce_range, "per_channel": True, "activations": "uint8", "weights": "int8",
                    "format": "QDQ", "kept_float": None}


def _latency(s_float, s_q, x1, precision: str, provider: str, threads, min_speedup: float) -> dict:
    """Batch-1 medians of both sessions, interleaved (`time_interleaved`, as `edgetl bench`)."""
    from edgetl.deploy.bench import time_interleaved

    stats = time_interleaved({"float32": lambda: s_float.run([C.PROBABILITIES], {C.IMAGE: x1}),
                              precision: lambda: s_q.run([C.PROBABILITIES], {C.IMAGE: x1})},
                             rounds=GATE_ROUNDS, warmup=5, budget_s=GATE_BUDGET_S)
    f_ms, q_ms = stats["float32"]["p50_ms"], stats[precision]["p50_ms"]
    return {"provider": provider, "threads": threads or 0, "batch": 1, "float32_ms": f_ms, f"{precision}_ms": q_ms,
            "speedup": f_ms / q_ms, "runs": stats["float32"]["runs"], "min_speedup": min_speedup}


def _with_metadata(q, source, summary: dict) -> bytes:
    """The float32 model's metadata plus precision, source hash, calibration and the gate's figures; checked."""
    from edgetl.export.torch_onnx import set_metadata

    p = summary["precision"]
    gate = {k: summary[k] for k in ("accuracy_drop", "agreement", "max_drop", "latency", "forced")}
    gate.update({"float32_accuracy": summary["float32"]["accuracy"], f"{p}_accuracy": summary[p]["accuracy"],
                 "validation_images": summary["validation"]["images"], "split": summary["validation"]["split"]})
    meta = {m.key: m.value for m in source.metadata_props}
    meta.update({C.KEY_VERSION: __version__, C.KEY_PRECISION: p, C.KEY_SOURCE_SHA256: summary["source_sha256"],
                 C.KEY_GATE: json.dumps(gate)})
    if summary["calibration"] is not None:
        meta[C.KEY_CALIBRATION] = json.dumps(summary["calibration"])
    del q.metadata_props[:]
    set_metadata(q, meta)
    q.producer_name, q.producer_version = "edgetl", __version__
    _check_io(q, source)
    return q.SerializeToString()


def write_quantized(result: QuantResult, out) -> Path:
    """Write a gated model atomically (temporary file, then rename)."""
    from edgetl.files import write_bytes

    write_bytes(out, result.data)
    return Path(out)


def quantize_file(model_path, data, out=None, precision: str = "int8", **kw) -> tuple[QuantResult, Path]:
    """`edgetl quantize`: gate, then write beside the model (model.int8.onnx) or to `out`."""
    from edgetl.files import writable_dir

    out = Path(out) if out else default_output(model_path, precision)
    if out.resolve() == Path(model_path).resolve():
        raise OutputError(f"-o {out} would overwrite the float32 model")
    writable_dir(out.parent)  # fail before the slow part
    result = quantize_model(model_path, data, precision=precision, **kw)
    return result, write_quantized(result, out)
