"""The host-side image path: decode → RGB (EXIF orientation applied) → resize/crop → uint8 HWC.

One function, `load_image`, used by embed, evaluate, predict and run, so that training and
deployment see identical pixels. Only numpy and OpenCV are needed (Pillow, when present, is used
to read image headers cheaply, so huge images are decoded at reduced scale).

Resize policy "shorter-center/v1": scale so the shorter side equals `resize_size` (INTER_AREA when
shrinking, INTER_CUBIC when enlarging), then take the centre `input_size` crop.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from pathlib import Path

import numpy as np

from .errors import ImageError

# OpenCV refuses images above this many pixels; we check headers ourselves first.
MAX_PIXELS = 200_000_000
POLICY = "shorter-center/v1"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".dib", ".webp", ".tif", ".tiff",
                  ".ppm", ".pgm", ".pbm", ".pnm", ".gif", ".jp2"}


@dataclasses.dataclass(frozen=True)
class Spec:
    """How a backbone wants its pixels. Normalisation (mean/std) happens inside the ONNX graph."""

    input_size: tuple[int, int]  # (height, width) fed to the graph
    resize_size: int  # shorter side before the centre crop
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    policy: str = POLICY

    @classmethod
    def from_crop_pct(cls, input_size, crop_pct, mean, std) -> "Spec":
        h, w = input_size
        return cls((int(h), int(w)), int(round(min(h, w) / crop_pct)), tuple(map(float, mean)),
                   tuple(map(float, std)))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Spec":
        d = json.loads(text)
        return cls(tuple(d["input_size"]), int(d["resize_size"]), tuple(d["mean"]), tuple(d["std"]),
                   d.get("policy", POLICY))


def _cv2():
    import cv2

    global _CV2_READY
    if not _CV2_READY:
        cv2.setNumThreads(1)  # decoding runs in our own thread pool; OpenCV's pool would oversubscribe
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)  # we report errors ourselves
        _CV2_READY = True
    return cv2


_CV2_READY = False


def _header_size(data: bytes, name: str) -> tuple[int, int] | None:
    """(width, height) from the image header without decoding the pixels, if Pillow is present."""
    try:
        from PIL import Image
    except ImportError:  # the torch-free runtime may run without Pillow
        return None
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: {str(e).split(' pixels')[0]} pixels is over the limit (decompression bomb?)") from None
    except Exception:  # Pillow cannot read it; let OpenCV try and report
        return None


def _truncated_jpeg(data: bytes) -> bool:
    """A JPEG without its end marker: OpenCV would fill the missing part with grey, so check it fully."""
    if data[:2] != b"\xff\xd8" or data.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9"):
        return False
    try:  # trailers after the end marker are legitimate; only a real decode tells
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            im.load()
        return False
    except ImportError:
        return False
    except Exception:
        return True


def decode(data: bytes, min_side: int = 0, name: str = "image") -> np.ndarray:
    """Decode encoded image bytes to uint8 RGB HWC, EXIF orientation applied.

    Any mode (grayscale, RGBA, palette, CMYK, 16-bit) becomes 8-bit RGB. When `min_side` is given
    and the image is a JPEG much larger than that, it is decoded at 1/2, 1/4 or 1/8 scale (never
    below `min_side`). Raises ImageError for empty, corrupt, non-image or oversized input.
    """
    cv2 = _cv2()
    if not data:
        raise ImageError(f"{name}: empty file")
    size = _header_size(data, name)
    flag = cv2.IMREAD_COLOR
    if size is not None:
        w, h = size
        if w * h > MAX_PIXELS:
            raise ImageError(f"{name}: {w}x{h} pixels is over the limit of {MAX_PIXELS:,}")
        if min_side and data[:2] == b"\xff\xd8":
            for factor, reduced in ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
                                    (2, cv2.IMREAD_REDUCED_COLOR_2)):
                if min(w, h) // factor >= min_side:
                    flag = reduced
                    break
    if _truncated_jpeg(data):
        raise ImageError(f"{name}: truncated JPEG")
    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        bgr = cv2.imdecode(buf, flag)
    except cv2.error as e:
        raise ImageError(f"{name}: cannot decode ({str(e).strip().splitlines()[-1]})") from None
    if bgr is None or bgr.size == 0:
        raise ImageError(f"{name}: not a readable image")
    if bgr.ndim == 2:
        bgr = cv2.cvtColor(bgr, cv2.COLOR_GRAY2BGR)
    if bgr.dtype != np.uint8:  # some decoders keep 16 bits even with IMREAD_COLOR
        bgr = (bgr / 257.0).round().astype(np.uint8)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def resize_crop(rgb: np.ndarray, spec: Spec) -> np.ndarray:
    """Resize the shorter side to spec.resize_size, then centre-crop spec.input_size. uint8 HWC."""
    cv2 = _cv2()
    h, w = rgb.shape[:2]
    out_h, out_w = spec.input_size
    scale = spec.resize_size / min(h, w)
    # Never let the scaled image be smaller than the crop (non-square input sizes).
    scale = max(scale, out_h / h, out_w / w)
    new_w, new_h = max(out_w, round(w * scale)), max(out_h, round(h * scale))
    if (new_w, new_h) != (w, h):
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
        rgb = cv2.resize(rgb, (new_w, new_h), interpolation=interp)
    top, left = (new_h - out_h) // 2, (new_w - out_w) // 2
    return np.ascontiguousarray(rgb[top:top + out_h, left:left + out_w])


def load_image(source: str | os.PathLike | bytes, spec: Spec) -> np.ndarray:
    """The one host-side preprocessing function: a path or encoded bytes → uint8 RGB [H, W, 3]."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, name = bytes(source), "image"
    else:
        name = str(source)
        try:
            data = Path(source).read_bytes()
        except OSError as e:
            raise ImageError(f"{name}: {e.strerror}") from None
    return resize_crop(decode(data, min_side=spec.resize_size, name=name), spec)


def frame_to_input(bgr: np.ndarray, spec: Spec) -> np.ndarray:
    """A camera/video frame (OpenCV BGR uint8) → the same uint8 RGB crop `load_image` makes."""
    return resize_crop(_cv2().cvtColor(bgr, _cv2().COLOR_BGR2RGB), spec)
