"""The host-side image path: decode → RGB (EXIF orientation applied) → resize/crop → uint8 HWC.

One function, `load_image`, used by embed, evaluate, predict and run, so that training and
deployment see identical pixels. Only numpy and OpenCV are needed (Pillow, when present, is used
to read image headers cheaply, so huge images are decoded at reduced scale).

Resize policy "shorter-center/v1": scale so the shorter side equals `resize_size` (INTER_AREA when
shrinking, INTER_CUBIC when enlarging), then take the centre `input_size` crop.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import threading

import numpy as np

from edgetl.data.sources import read_regular
from edgetl.errors import ImageError
from edgetl.spec import Spec

# Images above this many pixels are refused (headers are read first, nothing is decoded). JPEGs are
# decoded at 1/2..1/8 scale when that is enough, so only a JPEG can come near this size in memory as
# a fraction of it; other formats decode at full size and have a lower limit.
MAX_PIXELS = 200_000_000
MAX_FULL_PIXELS = 100_000_000  # PNG, TIFF, WebP…: 100 MP is 300 MB of pixels
# Decodes running at once (one per decode thread) share this many pixels: the memory of decoding stays
# bounded however many threads decode huge images at the same time.
DECODE_BUDGET_PIXELS = 150_000_000


def opencv():
    import cv2

    global _CV2_READY
    if not _CV2_READY:
        os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(MAX_PIXELS))  # OpenCV's own guard, for any format
        cv2.setNumThreads(1)  # decoding runs in our own thread pool; OpenCV's pool would oversubscribe
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)  # we report errors ourselves
        _CV2_READY = True
    return cv2


_CV2_READY = False


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's SOF marker; None if not found."""
    i, n = 2, len(data)
    while i + 9 < n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
        i += 2 + length
    return None


def header_size(data: bytes, name: str) -> tuple[int, int] | None:
    """(width, height) from the image header without decoding the pixels (JPEG and PNG parsed here,
    other formats by Pillow when it is present)."""
    if data[:2] == b"\xff\xd8":
        size = _jpeg_size(data)
        if size is not None:
            return size
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
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


class _PixelBudget:
    """A counting semaphore over pixels: decodes wait until their pixels fit beside the others'."""

    def __init__(self, total: int):
        self.total, self.used = total, 0
        self.cond = threading.Condition()

    @contextlib.contextmanager
    def take(self, pixels: int):
        pixels = min(max(pixels, 1), self.total)
        with self.cond:
            while self.used + pixels > self.total:
                self.cond.wait()
            self.used += pixels
        try:
            yield
        finally:
            with self.cond:
                self.used -= pixels
                self.cond.notify_all()


_BUDGET = _PixelBudget(DECODE_BUDGET_PIXELS)
UNKNOWN_SIZE_PIXELS = 12_000_000  # what a decode whose header we could not read is counted as


def truncated_jpeg(data: bytes) -> bool:
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


def decode_bgr(data: bytes, min_side: int = 0, name: str = "image") -> np.ndarray:
    """As `decode`, but in OpenCV's BGR order (convert after cropping: fewer pixels).

    Any mode (grayscale, RGBA, palette, CMYK, 16-bit) becomes 8-bit RGB. When `min_side` is given
    and the image is a JPEG much larger than that, it is decoded at 1/2, 1/4 or 1/8 scale (never
    below `min_side`). Raises ImageError for empty, corrupt, non-image or oversized input.
    """
    cv2 = opencv()
    if not data:
        raise ImageError(f"{name}: empty file")
    size = header_size(data, name)
    flag, pixels = cv2.IMREAD_COLOR, UNKNOWN_SIZE_PIXELS
    if size is not None:
        w, h = size
        jpeg = data[:2] == b"\xff\xd8"
        limit = MAX_PIXELS if jpeg else MAX_FULL_PIXELS
        if w * h > limit:
            only = "" if jpeg else " (only JPEGs are decoded at reduced size)"
            raise ImageError(f"{name}: {w}x{h} pixels is over the limit of {limit:,}{only}")
        pixels = w * h
        if min_side and jpeg:
            for factor, reduced in ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
                                    (2, cv2.IMREAD_REDUCED_COLOR_2)):
                if min(w, h) // factor >= min_side:
                    flag, pixels = reduced, w * h // (factor * factor)
                    break
    if truncated_jpeg(data):
        raise ImageError(f"{name}: truncated JPEG")
    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        with _BUDGET.take(pixels):
            bgr = cv2.imdecode(buf, flag)
    except cv2.error as e:
        raise ImageError(f"{name}: cannot decode ({str(e).strip().splitlines()[-1]})") from None
    if bgr is None or bgr.size == 0:
        raise ImageError(f"{name}: not a readable image")
    if bgr.ndim == 2:
        bgr = cv2.cvtColor(bgr, cv2.COLOR_GRAY2BGR)
    if bgr.dtype != np.uint8:  # some decoders keep 16 bits even with IMREAD_COLOR
        bgr = (bgr / 257.0).round().astype(np.uint8)
    return bgr


def decode(data: bytes, min_side: int = 0, name: str = "image") -> np.ndarray:
    """Decode encoded image bytes to uint8 RGB HWC, EXIF orientation applied.

    Any mode (grayscale, RGBA, palette, CMYK, 16-bit) becomes 8-bit RGB. When `min_side` is given
    and the image is a JPEG much larger than that, it is decoded at 1/2, 1/4 or 1/8 scale (never
    below `min_side`). Raises ImageError for empty, corrupt, non-image or oversized input.
    """
    return opencv().cvtColor(decode_bgr(data, min_side, name), opencv().COLOR_BGR2RGB)


def crop_box(h: int, w: int, spec: Spec) -> tuple[int, int, int, int]:
    """The source rectangle (top, left, height, width) that becomes the input after scaling.

    Equivalent to: scale the shorter side to resize_size, then take the centre input_size crop.
    """
    out_h, out_w = spec.input_size
    scale = max(spec.resize_size / min(h, w), out_h / h, out_w / w)
    ch, cw = min(h, round(out_h / scale)), min(w, round(out_w / scale))
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def resize_crop(img: np.ndarray, spec: Spec) -> np.ndarray:
    """Centre-crop the region that the policy keeps, then resize it to spec.input_size. uint8 HWC.

    Cropping first means only kept pixels are resampled. INTER_AREA when shrinking by more than 2×
    (anti-aliasing), INTER_LINEAR for milder shrinking, INTER_CUBIC when enlarging.
    """
    cv2 = opencv()
    top, left, ch, cw = crop_box(*img.shape[:2], spec)
    region = img[top:top + ch, left:left + cw]
    out_h, out_w = spec.input_size
    if (ch, cw) == (out_h, out_w):
        return np.ascontiguousarray(region)
    shrink = out_h / ch
    interp = cv2.INTER_AREA if shrink < 0.5 else cv2.INTER_LINEAR if shrink < 1 else cv2.INTER_CUBIC
    return cv2.resize(region, (out_w, out_h), interpolation=interp)


def load_image(source: str | os.PathLike | bytes, spec: Spec, name: str | None = None) -> np.ndarray:
    """The one host-side preprocessing function: a path or encoded bytes → uint8 RGB [H, W, 3].

    Raises ImageError (one line, naming the image) when it cannot be decoded.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, name = bytes(source), name or "image"
    else:
        name = name or str(source)
        data = read_regular(source, name)
    return frame_to_input(decode_bgr(data, min_side=spec.resize_size, name=name), spec)


def frame_to_input(bgr: np.ndarray, spec: Spec) -> np.ndarray:
    """A decoded BGR image or camera/video frame (OpenCV order) → uint8 RGB [H, W, 3] model input."""
    return opencv().cvtColor(resize_crop(bgr, spec), opencv().COLOR_BGR2RGB)


def view_seed(key: bytes, view: str) -> int:
    """A deterministic seed for augmented view `view` of the image whose cache key is `key`."""
    return int.from_bytes(hashlib.sha256(key + view.encode()).digest()[:8], "little")


def augment_view(bgr: np.ndarray, spec: Spec, seed: int) -> np.ndarray:
    """A seeded augmentation → uint8 RGB input: random resized crop (scale 0.25–1, ratio 3/4–4/3),
    horizontal flip, light brightness/contrast/saturation jitter (±20 %). Same seed, same pixels."""
    cv2 = opencv()
    rng = np.random.default_rng(seed)
    h, w = bgr.shape[:2]
    out_h, out_w = spec.input_size
    for _ in range(10):
        area = h * w * rng.uniform(0.25, 1.0)
        ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = int(round(np.sqrt(area * ratio))), int(round(np.sqrt(area / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            break
    else:
        top, left, ch, cw = crop_box(h, w, spec)
    region = bgr[top:top + ch, left:left + cw]
    interp = cv2.INTER_AREA if out_h / ch < 0.5 else cv2.INTER_LINEAR
    img = cv2.resize(region, (out_w, out_h), interpolation=interp)
    if rng.random() < 0.5:
        img = img[:, ::-1]
    img = img.astype(np.float32)
    img *= rng.uniform(0.8, 1.2)  # brightness
    mean = img.mean()
    img = (img - mean) * rng.uniform(0.8, 1.2) + mean  # contrast
    grey = img.mean(axis=2, keepdims=True)
    img = (img - grey) * rng.uniform(0.8, 1.2) + grey  # saturation
    rgb = np.clip(img, 0, 255).astype(np.uint8)[..., ::-1]
    return np.ascontiguousarray(rgb)
