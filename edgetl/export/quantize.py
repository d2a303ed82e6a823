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

import dataclasses
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from edgetl import __version__
from edgetl import contract as C
from edgetl.deploy.bench import time_interleaved
from edgetl.deploy.runtime import load_model, select_split
from edgetl.errors import DataError, GateRefused, ModelError, OutputError, ParityError
from edgetl.export.calibrate import Images, calibration_images, float_plans, input_chain, to_fp16, to_int8
from edgetl.export.graph import check_model, load, metadata, prepare, set_metadata, sha256_bytes
from edgetl.export.torch_onnx import max_abs_diff
from edgetl.files import writable_dir, write_bytes
from edgetl.ort import session
from edgetl.quality.metrics import metrics

PRECISIONS = ("int8", "fp16")
CALIBRATIONS = ("minmax", "percentile", "entropy")
MIN_SPEEDUP = 1.05  # "faster" means at least this ratio of medians (two-core machines are noisy)
GATE_ROUNDS = 100  # interleaved batch-1 runs per model, at most (GATE_BUDGET_S bounds the time)
GATE_BUDGET_S = 10.0


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


# ---------------------------------------------------------------------------------------------------
# Images


# ---------------------------------------------------------------------------------------------------
# Converters


def _check_io(model, source) -> None:
    """The converted model keeps the contract: image uint8 [N,H,W,3] in, probabilities float32 [N,C] out."""
    def sig(m):
        return [(v.name, v.type.tensor_type.elem_type, [d.dim_value for d in v.type.tensor_type.shape.dim][1:])
                for v in (*m.graph.input, *m.graph.output)]

    if sig(model) != sig(source):
        raise ModelError(f"the converted model's inputs/outputs {sig(model)} differ from the float32 model's "
                         f"{sig(source)}; nothing written")
    check_model(model)


# ---------------------------------------------------------------------------------------------------
# The gate


def predictions(sess, images: Images) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(predicted class, top probability, true label) per validation image."""
    pred, top, true = [], [], []
    for batch, labels in images.batches():
        p = sess.run([C.PROBABILITIES], {C.IMAGE: batch})[0]
        pred.append(p.argmax(1))
        top.append(p.max(1))
        true.append(labels)
    if not pred:  # not one photo could be read: the caller says so in one line
        return np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64)
    return np.concatenate(pred), np.concatenate(top), np.concatenate(true)


def _load_source(model, work: Path):
    """(proto, bytes, path on disk, display name) of the float32 model; ModelError when unusable."""
    import onnx

    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        proto = load(path, C.FORMAT_MODEL)
        data, name = path.read_bytes(), str(path)
    else:
        proto = model if isinstance(model, onnx.ModelProto) else onnx.load_from_string(bytes(model))
        data, name = proto.SerializeToString(), "the model"
        path = work / "float32.onnx"
        path.write_bytes(data)
    meta = metadata(proto)
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
    log = log or (lambda line: None)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}")
    if calibration not in CALIBRATIONS:
        raise ValueError(f"calibration must be one of {CALIBRATIONS}")
    device = device or ("cpu" if precision == "int8" else "auto")
    rr = default_reduce_range() if reduce_range is None else bool(reduce_range)
    _remove_stale_work()
    with tempfile.TemporaryDirectory(prefix=f"edgetl-quant-{os.getpid()}-") as tmp:
        work = Path(tmp)
        source, source_bytes, source_path, name = _load_source(model, work)
        fm = load_model(source_path, "cpu")
        try:
            val = select_split(fm, data, "val")
        except DataError as e:
            raise DataError(f"no validation photos to check the {precision} model on ({e})") from None
        images = Images(val.items, fm.spec, fm.classes)
        s_float = session(source_bytes, device, threads)
        provider = s_float.get_providers()[0]
        f_pred, _, y = predictions(s_float, images)
        if not len(y):
            first = f" (first: {images.skipped[0]})" if images.skipped else ""
            raise DataError(f"none of the {len(val.items)} validation photos of {data} could be read{first}; "
                            "nothing written")
        f_metrics = metrics(y, f_pred, fm.classes)
        log(f"float32: val accuracy {f_metrics['accuracy']:.4f} on {len(y)} photos ({val.note}), {provider}")

        x_check = next(images.batches())[0][:8]
        prepared = _checked_prepare(source, source_bytes, x_check, work / "prepared.onnx")
        always_float = input_chain(prepared) + [n.name for n in prepared.graph.node if n.op_type == "Softmax"]
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
                q = to_int8(work / "prepared.onnx", work / "q.onnx", cal_images, calibration, rr, always_float + keep,
                          work / "calibration.json")
            else:
                q = to_fp16(prepared, always_float)
            s_q = session(q.SerializeToString(), device, threads)
            q_pred, _, _ = predictions(s_q, images)
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
    stats = time_interleaved({"float32": lambda: s_float.run([C.PROBABILITIES], {C.IMAGE: x1}),
                              precision: lambda: s_q.run([C.PROBABILITIES], {C.IMAGE: x1})},
                             rounds=GATE_ROUNDS, warmup=5, budget_s=GATE_BUDGET_S)
    f_ms, q_ms = stats["float32"]["p50_ms"], stats[precision]["p50_ms"]
    return {"provider": provider, "threads": threads or 0, "batch": 1, "float32_ms": f_ms, f"{precision}_ms": q_ms,
            "speedup": f_ms / q_ms, "runs": stats["float32"]["runs"], "min_speedup": min_speedup}


def _with_metadata(q, source, summary: dict) -> bytes:
    """The float32 model's metadata plus precision, source hash, calibration and the gate's figures; checked."""
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
    write_bytes(out, result.data)
    return Path(out)


def _remove_stale_work() -> None:
    """Work folders of quantize runs that were killed (their process is gone: kill -9 leaves them)."""
    import shutil

    for d in Path(tempfile.gettempdir()).glob("edgetl-quant-*-*"):
        try:
            pid = int(d.name.split("-")[2])
            if pid == os.getpid() or d.stat().st_uid != os.getuid():
                continue
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (ValueError, IndexError, OSError):
            continue


def quantize_file(model_path, data, out=None, precision: str = "int8", **kw) -> tuple[QuantResult, Path]:
    """`edgetl quantize`: gate, then write beside the model (model.int8.onnx) or to `out`. Ctrl-C and
    SIGTERM end it at once, its work folder removed (exit 130 / 143)."""
    import signal
    import threading

    out = Path(out) if out else default_output(model_path, precision)
    if out.resolve() == Path(model_path).resolve():
        raise OutputError(f"-o {out} would overwrite the float32 model")
    writable_dir(out.parent)  # fail before the slow part

    def interrupted(signum, frame):  # nothing is written before the gate passes: remove the work folder, leave
        import shutil
        import sys

        for d in Path(tempfile.gettempdir()).glob(f"edgetl-quant-{os.getpid()}-*"):
            shutil.rmtree(d, ignore_errors=True)
        print("interrupted; nothing written", file=sys.stderr, flush=True)
        os._exit(128 + signum)  # not an exception: one landing inside an extension's import aborts the interpreter

    main = threading.current_thread() is threading.main_thread()
    old = {sig: signal.signal(sig, interrupted) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        result = quantize_model(model_path, data, precision=precision, **kw)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    return result, write_quantized(result, out)
