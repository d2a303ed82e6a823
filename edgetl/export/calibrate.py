"""What quantization needs besides the gate: the labelled photos it reads (decoded by the one
preprocessing), the calibration set and its reader, the converters (int8 static QDQ, fp16), and the
plans of nodes kept in float. onnx and onnxruntime's quantization tools are imported where used.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgetl import contract as C
from edgetl.data.pipeline import image_batches
from edgetl.export.graph import toposort

IN_MEMORY_BYTES = 1 << 30  # validation images kept decoded up to this size, else decoded again per pass


def input_chain(model) -> list[str]:
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


class Images:
    """Labelled photos decoded with `load_image`: kept in memory when small, else decoded per pass."""

    def __init__(self, items, spec, classes: list[str], batch_size: int = 32):
        self.items, self.spec, self.batch_size = items, spec, batch_size
        self.labels_of = {it.path: classes.index(it.label) for it in items}
        h, w = spec.input_size
        self._cache = [] if len(items) * h * w * 3 <= IN_MEMORY_BYTES else None
        self.skipped: list = []
        self._filled = False

    def batches(self):
        """Yield (uint8 [n,H,W,3], labels int [n])."""
        if self._filled:
            yield from self._cache
            return
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


class Reader:
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
def quiet():
    """onnxruntime's quantizer logs advice through the root logger, prints, and its sessions warn in C++."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    ort.set_default_logger_severity(3)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print progress
            yield
    finally:
        root.setLevel(level)


def to_int8(prepared_path: Path, out_path: Path, images, calibration: str, reduce_range: bool, exclude: list[str],
          cache_path: Path):
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[calibration]
    with quiet():
        quantize_static(str(prepared_path), str(out_path), Reader(images), quant_format=QuantFormat.QDQ,
                        per_channel=True, reduce_range=reduce_range, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, nodes_to_exclude=exclude, calibrate_method=method,
                        calibration_cache_path=str(cache_path), extra_options={"CalibStridedMinMax": 1})
    return onnx.load(str(out_path))


def to_fp16(prepared, exclude: list[str]):
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with quiet():
        m = convert_float_to_float16(prepared, keep_io_types=True, node_block_list=exclude)
    toposort(m)  # the converter appends the casts it adds at the end of the node list
    return m
