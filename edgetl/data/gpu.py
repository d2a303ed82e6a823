"""Decoding on the GPU (nvJPEG through torchvision) and a zero-copy hand-off to onnxruntime's CUDA provider.

The pixel policy is `preprocess.load_image`'s: EXIF orientation applied, any JPEG → 8-bit RGB, the
region `crop_box` keeps, resized with area averaging when shrinking by more than 2×, bilinear when
shrinking less, bicubic when enlarging. The pixels differ slightly from the CPU path's: another
JPEG decoder (IDCT, chroma upsampling), full-size decoding (the CPU path decodes large JPEGs at
1/2-1/8 scale), and torch's resampling kernels instead of OpenCV's. `compare_with_cpu` measures the
difference, `scripts/bench_gpu.py` reports it; a photo that is not a JPEG nvJPEG can take (PNG,
CMYK, 12-bit...) goes through the CPU path. Training side only (needs torch and torchvision).
"""

from __future__ import annotations

import numpy as np

from edgetl.data.preprocess import MAX_PIXELS, Spec, _header_size, _truncated_jpeg, crop_box, load_image
from edgetl.errors import ImageError


def usable(device: str = "cuda") -> bool:
    """torch and torchvision with a working `decode_jpeg` on `device` (tried on a tiny JPEG)."""
    try:
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        if device.startswith("cuda") and not torch.cuda.is_available():
            return False
        from edgetl.data.preprocess import _cv2

        ok, jpeg = _cv2().imencode(".jpg", np.full((8, 8, 3), 128, np.uint8))
        decode_jpeg([torch.from_numpy(jpeg.ravel())], mode=ImageReadMode.RGB, device=device)
        return True
    except Exception:  # noqa: BLE001 - any reason the GPU decoder cannot run here
        return False


def exif_orientation(data: bytes) -> int:
    """The EXIF orientation (1-8) of a JPEG, 1 when it has none."""
    i, n = 2, len(data)
    while i + 4 < n and data[i] == 0xFF:
        marker, length = data[i + 1], int.from_bytes(data[i + 2:i + 4], "big")
        if marker == 0xDA:  # start of scan: no more headers
            break
        if marker == 0xE1 and data[i + 4:i + 10] == b"Exif\x00\x00":
            return _tiff_orientation(data[i + 10:i + 2 + length])
        i += 2 + length
    return 1


def _tiff_orientation(t: bytes) -> int:
    if len(t) < 8 or t[:2] not in (b"II", b"MM"):
        return 1
    order = "little" if t[:2] == b"II" else "big"
    ifd = int.from_bytes(t[4:8], order)
    if ifd + 2 > len(t):
        return 1
    for k in range(int.from_bytes(t[ifd:ifd + 2], order)):
        e = ifd + 2 + 12 * k
        if e + 12 > len(t):
            break
        if int.from_bytes(t[e:e + 2], order) == 0x0112:
            v = int.from_bytes(t[e + 8:e + 10], order)
            return v if 1 <= v <= 8 else 1
    return 1


def orient(chw, orientation: int):
    """Apply an EXIF orientation to a C×H×W tensor (what a viewer shows)."""
    if orientation in (5, 6, 7, 8):
        chw = chw.transpose(-1, -2)
    flips = {2: (-1,), 3: (-1, -2), 4: (-2,), 6: (-1,), 7: (-1, -2), 8: (-2,)}.get(orientation)
    return chw.flip(flips) if flips else chw


def resize_crop(chw, spec: Spec):
    """`preprocess.resize_crop` on a uint8 C×H×W tensor (any device) → uint8 H×W×3."""
    import torch
    import torch.nn.functional as F

    top, left, ch, cw = crop_box(chw.shape[1], chw.shape[2], spec)
    region = chw[:, top:top + ch, left:left + cw]
    out_h, out_w = spec.input_size
    if (ch, cw) == (out_h, out_w):
        return region.permute(1, 2, 0)
    x = region[None].float()
    shrink = out_h / ch
    if shrink < 0.5:
        y = F.interpolate(x, size=(out_h, out_w), mode="area")
    elif shrink < 1:
        y = F.interpolate(x, size=(out_h, out_w), mode="bilinear", align_corners=False, antialias=False)
    else:
        y = F.interpolate(x, size=(out_h, out_w), mode="bicubic", align_corners=False)
    return y[0].round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0)


def _gpu_able(data: bytes) -> bool:
    """A baseline or progressive 8-bit JPEG with 1 or 3 components (what nvJPEG decodes to RGB)."""
    i, n = 2, len(data)
    if data[:2] != b"\xff\xd8":
        return False
    while i + 9 < n and data[i] == 0xFF:
        marker, length = data[i + 1], int.from_bytes(data[i + 2:i + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2):
            return data[i + 4] == 8 and data[i + 9] in (1, 3)
        if 0xC3 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return False  # lossless, arithmetic-coded...
        i += 2 + length
    return False


class Decoder:
    """Batches of encoded photos → uint8 [N, H, W, 3] on `device`, with the CPU path as fallback."""

    def __init__(self, spec: Spec, device: str = "cuda"):
        self.spec, self.device = spec, device
        self.on_cpu = 0  # photos that went through the CPU path

    def __call__(self, datas: list[bytes], names: list[str]):
        """(batch tensor of the photos that decoded, their indices in `datas`, [(index, reason)] of the rest)."""
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        out: list = [None] * len(datas)
        errors: list[tuple[int, str]] = []
        gpu = []
        for i, data in enumerate(datas):
            try:
                size = _header_size(data, names[i])
                if size and size[0] * size[1] > MAX_PIXELS:
                    raise ImageError(f"{names[i]}: {size[0]}x{size[1]} pixels is over the limit of {MAX_PIXELS:,}")
                if _gpu_able(data) and not _truncated_jpeg(data):
                    gpu.append(i)
                else:
                    out[i] = self._cpu(data, names[i])
            except ImageError as e:
                errors.append((i, str(e)))
        if gpu:
            tensors = [torch.frombuffer(bytearray(datas[i]), dtype=torch.uint8) for i in gpu]
            try:
                decoded = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device)
            except RuntimeError:  # one photo the GPU decoder refuses: decode them one by one
                decoded = []
                for t in tensors:
                    try:
                        decoded.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=self.device))
                    except RuntimeError:
                        decoded.append(None)
            for i, img in zip(gpu, decoded):
                try:
                    out[i] = (resize_crop(orient(img, exif_orientation(datas[i])), self.spec) if img is not None
                              else self._cpu(datas[i], names[i]))
                except ImageError as e:
                    errors.append((i, str(e)))
        ok = [i for i in range(len(datas)) if out[i] is not None]
        batch = torch.stack([out[i] for i in ok]).contiguous() if ok else None
        return batch, ok, sorted(errors)

    def _cpu(self, data: bytes, name: str):
        import torch

        self.on_cpu += 1
        return torch.from_numpy(load_image(data, self.spec, name)).to(self.device)


def compare_with_cpu(paths, spec: Spec, device: str = "cuda") -> dict:
    """Mean and max absolute pixel difference between this decoder and `load_image` on `paths`."""
    datas = [open(p, "rb").read() for p in paths]
    batch, ok, _ = Decoder(spec, device)(datas, [str(p) for p in paths])
    gpu = batch.cpu().numpy().astype(np.int16)
    cpu = np.stack([load_image(datas[i], spec) for i in ok]).astype(np.int16)
    d = np.abs(gpu - cpu)
    return {"images": len(ok), "mean_abs": float(d.mean()), "max_abs": int(d.max()),
            "p99_abs": float(np.percentile(d, 99))}


class BoundRunner:
    """onnxruntime on CUDA fed from torch CUDA tensors: input and output bound in place (no copies
    through the host but the result's)."""

    def __init__(self, sess):
        self.sess = sess
        self.inp = sess.get_inputs()[0].name
        o = sess.get_outputs()[0]
        self.out = o.name
        self.tail = [d if isinstance(d, int) else None for d in o.shape[1:]]

    def __call__(self, x) -> np.ndarray:
        import torch

        if any(d is None for d in self.tail):
            raise ValueError("the output shape is not static")
        y = torch.empty((x.shape[0], *self.tail), dtype=torch.float32, device=x.device)
        b = self.sess.io_binding()
        dev = x.device.index or 0
        b.bind_input(self.inp, "cuda", dev, np.uint8, tuple(x.shape), x.data_ptr())
        b.bind_output(self.out, "cuda", dev, np.float32, tuple(y.shape), y.data_ptr())
        torch.cuda.current_stream(x.device).synchronize()  # the input is written
        self.sess.run_with_iobinding(b)
        b.synchronize_outputs()
        return y.cpu().numpy()
