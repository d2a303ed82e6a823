"""The onnxruntime layer, below everything that runs a model: providers that can load, sessions (one
for the CPU's cores or several side by side), a model file's bytes, its metadata checked against its
graph, and the hash of its graph. Needs onnxruntime and numpy only.
"""

from __future__ import annotations

import base64
import hashlib
import json
import mmap
import os
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgetl import contract as C
from edgetl.errors import EdgetlError, ModelError
from edgetl.spec import Spec

_CUDA_OK: bool | None = None


def cuda_usable() -> bool:
    """True when onnxruntime's CUDA provider really loads here (probed once, quietly)."""
    global _CUDA_OK
    if _CUDA_OK is None:
        _CUDA_OK = _probe_cuda()
    return _CUDA_OK


# A one-node ONNX model (Identity, float[1], opset 17, IR 8), serialised: the runtime needs no onnx package.
_PROBE_MODEL = "CAg6OwoQCgF4EgF5IghJZGVudGl0eRIFcHJvYmVaDwoBeBIKCggIARIECgIIAWIPCgF5EgoKCAgBEgQKAggBQgQKABAR"


def _probe_cuda() -> bool:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    if not (os.path.exists("/dev/nvidia0") or os.path.exists("/dev/dxg") or os.name == "nt"):
        return False
    try:
        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # CUDA/cuDNN from the nvidia-* wheels that torch brings, if any
        so = ort.SessionOptions()
        so.log_severity_level = 4
        s = ort.InferenceSession(base64.b64decode(_PROBE_MODEL), so, providers=["CUDAExecutionProvider"])
        return "CUDAExecutionProvider" in s.get_providers()
    except Exception:
        return False


def providers(device: str = "auto") -> list[str]:
    """onnxruntime providers for auto|cpu|cuda; only ones that can load. EdgetlError for cuda without a GPU."""
    if device not in ("auto", "cpu", "cuda"):
        raise EdgetlError(f"unknown device {device!r}; use auto, cpu or cuda")
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if cuda_usable():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise EdgetlError("--device cuda: onnxruntime's CUDA provider cannot load here "
                          "(needs onnxruntime-gpu, an NVIDIA GPU, CUDA 13 and cuDNN 9); use --device cpu")
    return ["CPUExecutionProvider"]


def physical_cores() -> int:
    """The cores this process may run on, a core's hyper-threads counted once (as onnxruntime counts
    them for its default thread count); every allowed CPU where the topology cannot be read."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
    cores = set()
    for c in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{c}/topology")
        try:
            cores.add(((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(c)))
    return max(1, len(cores))


CPU_SESSIONS_MAX = 8  # each holds its own buffers (~150 MB at batch 8 for EfficientNet-Lite0)


def cpu_sessions(threads: int | None = None) -> tuple[int, int]:
    """(sessions, threads each) for work that runs sessions side by side on the CPU (`embed`'s batches,
    `run`'s frames of a file): `threads` in all (None: the physical cores).

    Several sessions with one thread each, every one on its own batch or frame, beat one session whose
    threads split every layer: no thread waits for another at each layer (nor for one that a decoder
    preempted). At most CPU_SESSIONS_MAX sessions, more threads each beyond that."""
    total = threads or physical_cores()
    n = max(1, min(total, CPU_SESSIONS_MAX))
    return n, max(1, total // n)


def model_bytes(path: str | os.PathLike) -> bytes:
    """A model file's bytes, read once so that sessions made from them all run the same graph."""
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ModelError(f"{path}: {e.strerror}") from None


# The CUDA provider's own defaults (cuDNN's fastest algorithm searched once per input shape), measured best
# for long runs (`run`: 966 img/s at batch 1 on an H200). Short jobs (`embed`, one session per call) ask for
# HEURISTIC: 0.55 s instead of 1.57 s to the first batch, 6 % slower after. prefer_nhwc was faster on bare
# batches (11,548 vs 9,341 img/s at 256) but 2.3x slower inside embed and slower at batch 1: not used.
# EDGETL_CUDA_OPTIONS (a JSON object of provider options) overrides both.
CUDA_OPTIONS: dict[str, str] = {}
SHORT_JOB_CUDA_OPTIONS = {"cudnn_conv_algo_search": "HEURISTIC"}


def cuda_options(short_job: bool = False) -> dict[str, str]:
    raw = os.environ.get("EDGETL_CUDA_OPTIONS")
    if not raw:
        return dict(SHORT_JOB_CUDA_OPTIONS if short_job else CUDA_OPTIONS)
    try:
        opts = json.loads(raw)
        return {str(k): str(v) for k, v in opts.items()}
    except (ValueError, AttributeError):
        raise EdgetlError("EDGETL_CUDA_OPTIONS is not a JSON object of provider options") from None


def session(model: str | os.PathLike | bytes, device: str = "auto", threads: int | None = None,
            spin: bool = True, short_job: bool = False):
    """An onnxruntime InferenceSession on the best usable provider (CUDA with `cuda_options()`).

    spin=False stops idle worker threads from busy-waiting, which leaves the CPU to decoders
    running beside inference.
    """
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    src = model if isinstance(model, (bytes, bytearray)) else str(model)
    chosen = providers(device)
    attempts = [[(p, cuda_options(short_job)) if p == "CUDAExecutionProvider" else p for p in chosen], chosen]
    for i, provs in enumerate(attempts):
        try:
            return ort.InferenceSession(src, so, providers=provs)
        except EdgetlError:
            raise
        except Exception as e:
            if i == 0 and "CUDAExecutionProvider" in chosen:
                continue  # an option this build does not know: the provider's defaults
            raise ModelError(f"{model if not isinstance(model, bytes) else 'model'}: onnxruntime cannot load it: "
                             f"{ort_reason(e)}") from None


def ort_reason(e: Exception) -> str:
    """The useful tail of an onnxruntime error: no code prefix, no C++ signature, one line."""
    text = " ".join(str(e).split()) or type(e).__name__
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"^Load model from .*? failed:", "", text)
    if "onnxruntime::" in text and ") " in text:  # drop the C++ location and signature
        text = text.rsplit(") ", 1)[-1]
    return text.strip()[:300]


def read_metadata(sess) -> dict[str, str]:
    return dict(sess.get_modelmeta().custom_metadata_map)


def static_dim(shape, axis: int) -> int | None:
    v = shape[axis] if len(shape) > axis else None
    return v if isinstance(v, int) and v > 0 else None


def check_io(sess, meta: dict[str, str], path, output: str) -> Spec:
    """The preprocessing spec of an edgetl artifact, checked against its graph: one input `image`
    uint8 [N, H, W, 3] at the spec's size, one float output `output`. ModelError (one line) otherwise."""
    try:
        spec = Spec.from_json(meta[C.KEY_PREPROCESS])
    except KeyError:
        raise ModelError(f"{path}: edgetl metadata is incomplete (no preprocessing spec)") from None
    except (ValueError, TypeError, RecursionError) as e:
        raise ModelError(f"{path}: its preprocessing metadata is invalid ({str(e)[:120]})") from None
    ins, outs = sess.get_inputs(), sess.get_outputs()
    if len(ins) != 1 or ins[0].name != C.IMAGE or ins[0].type != "tensor(uint8)" or len(ins[0].shape) != 4:
        got = ", ".join(f"{i.name} {i.type}" for i in ins)
        raise ModelError(f"{path}: its graph does not take {C.IMAGE} uint8[N,H,W,3] (it takes {got})")
    h, w, ch = (static_dim(ins[0].shape, a) for a in (1, 2, 3))
    if ch != 3 or (h, w) != tuple(spec.input_size):
        raise ModelError(f"{path}: its metadata says input {spec.input_size[0]}x{spec.input_size[1]} but the graph "
                         f"takes {ins[0].shape[1]}x{ins[0].shape[2]}x{ins[0].shape[3]}")
    if len(outs) != 1 or outs[0].name != output or "float" not in outs[0].type:
        got = ", ".join(f"{o.name} {o.type}" for o in outs)
        raise ModelError(f"{path}: its graph does not output {output} (it outputs {got})")
    dim = meta.get(C.KEY_EMBEDDING_DIM)
    if output == C.EMBEDDING and dim is not None and static_dim(outs[0].shape, 1) not in (None, as_int(dim)):
        raise ModelError(f"{path}: its metadata says embeddings of size {dim} but the graph outputs {outs[0].shape}")
    return spec


def as_int(text) -> int | None:
    try:
        return int(text)
    except (TypeError, ValueError):
        return None


def output_dim(sess) -> int:
    """The size of one flattened output row of a session (0 when its shape is not static)."""
    dims = sess.get_outputs()[0].shape[1:]
    return int(np.prod(dims)) if all(isinstance(d, int) for d in dims) else 0


def graph_sha256(path: str | os.PathLike | bytes) -> str:
    """SHA-256 of an ONNX model's graph (weights included, metadata excluded): the bytes of the model's
    `graph` field as they lie in the file (the same bytes as onnx's serialisation of the parsed graph,
    found by walking the top-level fields instead of parsing everything: 9 ms instead of 30 for
    EfficientNet-Lite0). `path` may be the file's bytes."""
    if isinstance(path, (bytes, bytearray)):
        return _graph_field_sha256(path, "model")
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return _graph_field_sha256(m, path)
    except (OSError, ValueError):
        raise ModelError(f"{path}: cannot read its graph") from None


def _graph_field_sha256(m, name) -> str:
    def varint(i: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            byte = m[i]
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value, i + 1
            i, shift = i + 1, shift + 7

    try:
        i = 0
        while i < len(m):
            tag, i = varint(i)
            if tag & 7 == 0:
                i = varint(i)[1]
            elif tag & 7 in (1, 5):
                i += 8 if tag & 7 == 1 else 4
            elif tag & 7 == 2:
                n, i = varint(i)
                if i + n > len(m):
                    break
                if tag >> 3 == 7:  # ModelProto.graph
                    return hashlib.sha256(m[i:i + n]).hexdigest()
                i += n
            else:
                break
    except IndexError:
        pass
    raise ModelError(f"{name}: cannot read its graph")
