"""Torch-free inference: providers, sessions, edgetl model loading and prediction.

Needs only onnxruntime, numpy and OpenCV, so it is what ships to a device.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from edgetl import contract as C
from edgetl.data.preprocess import Spec, frame_to_input, load_image
from edgetl.errors import EdgetlError, ModelError

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
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    if not (os.path.exists("/dev/nvidia0") or os.path.exists("/dev/dxg") or os.name == "nt"):
        return False
    try:
        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # CUDA/cuDNN from the nvidia-* wheels that torch brings, if any
        import base64

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
    import onnxruntime as ort

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
                             f"{_ort_reason(e)}") from None


def _ort_reason(e: Exception) -> str:
    """The useful tail of an onnxruntime error: no code prefix, no C++ signature, one line."""
    import re

    text = " ".join(str(e).split()) or type(e).__name__
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"^Load model from .*? failed:", "", text)
    if "onnxruntime::" in text and ") " in text:  # drop the C++ location and signature
        text = text.rsplit(") ", 1)[-1]
    return text.strip()[:300]


def read_metadata(sess) -> dict[str, str]:
    return dict(sess.get_modelmeta().custom_metadata_map)


@dataclasses.dataclass
class Model:
    """A loaded edgetl model.onnx: uint8 images in, class probabilities out."""

    path: str
    session: object
    classes: list[str]
    spec: Spec
    metadata: dict[str, str]

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """uint8 [N,H,W,3] RGB (already preprocessed) → float32 [N,C]."""
        return self.session.run([C.PROBABILITIES], {C.IMAGE: batch})[0]

    def predict_files(self, paths) -> np.ndarray:
        return self.probabilities(np.stack([load_image(p, self.spec) for p in paths]))

    def predict_frame(self, bgr: np.ndarray) -> np.ndarray:
        return self.probabilities(frame_to_input(bgr, self.spec)[None])[0]

    def frame_runner(self):
        """A function uint8 [H,W,3] (preprocessed) → probabilities [C], for loops over single frames:
        input and output stay bound to buffers allocated once (on the GPU when the model runs there),
        so a frame costs one copy in and one out, and no allocation."""
        import onnxruntime as ort

        h, w = self.spec.input_size
        dev = "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"
        try:
            x = ort.OrtValue.ortvalue_from_shape_and_type([1, h, w, 3], np.uint8, dev, 0)
            y = ort.OrtValue.ortvalue_from_shape_and_type([1, len(self.classes)], np.float32, dev, 0)
            binding = self.session.io_binding()
            binding.bind_ortvalue_input(C.IMAGE, x)
            binding.bind_ortvalue_output(C.PROBABILITIES, y)
        except Exception:  # noqa: BLE001 - an onnxruntime without IO binding for this device
            return lambda img: self.probabilities(img[None])[0]
        if dev == "cpu":
            view = x.numpy()  # the input buffer itself, on the host

            def run(img):
                view[0] = img
                self.session.run_with_iobinding(binding)
                return y.numpy()[0].copy()  # the output buffer is reused by the next frame
        else:
            def run(img):
                x.update_inplace(np.ascontiguousarray(img[None]))
                self.session.run_with_iobinding(binding)
                return y.numpy()[0]
        return run


def load_model(path: str | os.PathLike, device: str = "auto", threads: int | None = None,
               spin: bool = True) -> Model:
    """Load an edgetl model.onnx; ModelError when it is missing, not ONNX, not an edgetl model, or its
    metadata does not match its graph (class names, input size, preprocessing).

    spin=False suits loops where another thread (capture, decoding) needs the CPU between runs.
    """
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"model not found: {p}")
    sess = session(p, device, threads, spin)
    meta = read_metadata(sess)
    if meta.get(C.KEY_FORMAT) != C.FORMAT_MODEL:
        kind = meta.get(C.KEY_FORMAT)
        what = f"an edgetl {kind}, not a fused model" if kind else "not an edgetl model (no edgetl metadata)"
        raise ModelError(f"{p}: {what}")
    spec = check_io(sess, meta, p, C.PROBABILITIES)
    n_out = _static(sess.get_outputs()[0].shape, 1)
    try:
        classes = json.loads(meta[C.KEY_CLASSES])
    except KeyError:
        raise ModelError(f"{p}: edgetl metadata is incomplete (no class names)") from None
    except (ValueError, RecursionError):
        raise ModelError(f"{p}: the class names in its metadata are not a list of names (invalid JSON)") from None
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes):
        raise ModelError(f"{p}: the class names in its metadata are not a list of names")
    if len(set(classes)) != len(classes):
        raise ModelError(f"{p}: its metadata repeats a class name")
    if n_out is not None and len(classes) != n_out:
        raise ModelError(f"{p}: its metadata names {len(classes)} classes but the graph outputs {n_out} "
                         "probabilities; the file was altered")
    return Model(str(p), sess, classes, spec, meta)


def _static(shape, axis: int) -> int | None:
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
    h, w, ch = (_static(ins[0].shape, a) for a in (1, 2, 3))
    if ch != 3 or (h, w) != tuple(spec.input_size):
        raise ModelError(f"{path}: its metadata says input {spec.input_size[0]}x{spec.input_size[1]} but the graph "
                         f"takes {ins[0].shape[1]}x{ins[0].shape[2]}x{ins[0].shape[3]}")
    if len(outs) != 1 or outs[0].name != output or "float" not in outs[0].type:
        got = ", ".join(f"{o.name} {o.type}" for o in outs)
        raise ModelError(f"{path}: its graph does not output {output} (it outputs {got})")
    dim = meta.get(C.KEY_EMBEDDING_DIM)
    if output == C.EMBEDDING and dim is not None and _static(outs[0].shape, 1) not in (None, _int(dim)):
        raise ModelError(f"{path}: its metadata says embeddings of size {dim} but the graph outputs {outs[0].shape}")
    return spec


def _int(text) -> int | None:
    try:
        return int(text)
    except (TypeError, ValueError):
        return None


@dataclasses.dataclass
class Selection:
    """The labelled images of a folder that one split of a model's data stands for."""

    items: list  # data.scan.Item, each with a label among the model's classes
    split: str  # "val" | "train" | "test" | "all"
    note: str  # one line for the user: what was scored and why
    trained_on: int | None = None  # how many selected photos the model was trained on (None: unknown)


def recorded_split(model: Model) -> dict | None:
    """The split train-head recorded in the model: {"train": set of key prefixes, "val": …, "note": …}."""
    from edgetl.data.split import decode_keys

    raw = model.metadata.get(C.KEY_SPLIT)
    if raw is None:
        return None
    try:
        d = json.loads(raw)
        return {"train": decode_keys(d["train"]), "val": decode_keys(d["val"]), "note": str(d.get("note", ""))}
    except (ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{model.path}: the recorded split is unreadable ({e})") from None


def _content_keys(items) -> list[bytes | None]:
    """The short content key of each item's file (None if unreadable)."""
    import hashlib

    from edgetl.data.pipeline import prefetch_map
    from edgetl.data.split import short

    def key(it):
        try:
            with open(it.path, "rb") as f:
                return short(hashlib.sha256(f.read()).digest())
        except OSError:
            return None

    return [k for _, k in prefetch_map(key, items)]


def select_split(model: Model, data: str | os.PathLike, split: str = "auto") -> Selection:
    """The images of `data` in `split` ("auto", "val", "train", "test" or "all") for `model`.

    auto/val: the folder's val/ when it has one; else the validation photos train-head recorded in the
    model (by content: renames and moves do not matter); photos the model never saw when none of those
    are here. train: the photos the model was trained on. all: everything (with a count of the
    training photos among them). DataError when nothing fits, or a class is not the model's.
    """
    from edgetl.data.scan import scan
    from edgetl.errors import DataError

    ds = scan(data)
    if not ds.classes:
        raise DataError(f"{data} has no class folders to evaluate against")
    unknown = sorted({it.label for it in ds.items} - set(model.classes))
    if unknown:
        raise DataError(f"class {unknown[0]!r} of {data} is not one of the model's classes ({', '.join(model.classes)})")
    rec = recorded_split(model)
    want = "val" if split == "auto" else split
    trained_on = None
    if want == "all" or ds.layout == "split":
        items = ds.items if want == "all" else [it for it in ds.items if it.split == want]
        if not items:
            raise DataError(f"{data} has no {want}/ folder")
        note = f"every photo in {data}" if want == "all" else f"the {want}/ folder of {data}"
        if rec:
            trained_on = sum(k in rec["train"] for k in _content_keys(items))
            if trained_on and want != "train":
                note += f"; {trained_on} of them were used for training"
        elif want == "all":
            note += " (the model records no split: training photos may be among them)"
    elif want == "test":
        raise DataError(f"{data} has no test/ folder")
    elif rec:  # class folders: the split recorded in the model, by content
        keys = _content_keys(ds.items)
        items = [it for it, k in zip(ds.items, keys) if k in rec[want]]
        note = f"the {len(items)} {'validation' if want == 'val' else 'training'} photos recorded in the model"
        trained_on = len(items) if want == "train" else 0
        if want == "val" and not items:  # another folder: score what the model never saw
            items = [it for it, k in zip(ds.items, keys) if k not in rec["train"]]
            note = f"the {len(items)} photos of {data} that the model was not trained on"
        if not items:
            raise DataError(f"every photo in {data} was used to train this model: no honest score "
                            "(--split all scores them anyway)")
    else:
        if split != "auto":
            raise DataError(f"{data} has no {want}/ folder and the model records no split; use --split all")
        items = ds.items
        note = f"every photo in {data} (the model records no split: training photos may be among them)"
    return Selection(items, want, note, trained_on)


def evaluate(model: Model, data: str | os.PathLike, split: str = "auto", batch_size: int = 32, rows: list | None = None):
    """Accuracy, per-class metrics and confusion matrix of `model` on a labelled folder.

    split: as `select_split`. Returns (metrics dict, skipped [(path, reason)], Selection). Torch-free.
    `rows`, when given, receives (path, true class index, probabilities) for every scored photo.
    """
    from edgetl.data.pipeline import image_batches
    from edgetl.quality.report import metrics

    sel = select_split(model, data, split)
    label_of = {it.path: model.classes.index(it.label) for it in sel.items}
    y_true, y_pred, skipped = [], [], []
    for paths, batch, errors in image_batches([it.path for it in sel.items], model.spec, batch_size):
        skipped += errors
        if batch is not None:
            probs = model.probabilities(batch)
            y_pred += probs.argmax(1).tolist()
            y_true += [label_of[p] for p in paths]
            if rows is not None:
                rows += [(p, label_of[p], row) for p, row in zip(paths, probs)]
    return metrics(y_true, y_pred, model.classes), skipped, sel


def expand_paths(patterns) -> list[Path]:
    """Files, folders (every image below) and globs → image paths, in a stable order."""
    import glob

    from edgetl.data.scan import images_under
    from edgetl.errors import DataError

    out: list[Path] = []
    for pat in patterns:
        p = Path(pat)
        if p.is_dir():
            out += images_under(p)
        elif p.is_file():
            out.append(p)
        else:
            hits = sorted(glob.glob(str(pat), recursive=True))
            if not hits:
                raise DataError(f"no such file, folder or glob match: {pat}")
            out += [Path(h) for h in hits if Path(h).is_file()]
    return out


VIDEO_SUFFIXES = {".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".wmv", ".mpg", ".mpeg", ".ts", ".3gp"}


def is_video(path) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def predict(model: Model, paths: list[Path], top_k: int = 1, batch_size: int = 32):
    """Yield (path, [(class, probability)…top_k] or None, error or None) per image, in order."""
    from edgetl.data.pipeline import image_batches

    k = max(1, min(top_k, len(model.classes)))
    for ok, batch, errors in image_batches(list(enumerate(paths)), model.spec, batch_size, path=lambda t: t[1]):
        rows = [(i, p, None, err) for (i, p), err in errors]
        if batch is not None:
            for (i, p), row in zip(ok, model.probabilities(batch)):
                order = np.argsort(-row, kind="stable")[:k]
                rows.append((i, p, [(model.classes[j], float(row[j])) for j in order], None))
        for _, p, top, err in sorted(rows, key=lambda r: r[0]):  # input order
            yield p, top, err
