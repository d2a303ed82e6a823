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

import warnings

import numpy as np

from edgetl.data.preprocess import MAX_PIXELS, crop_box, header_size, load_image, opencv, truncated_jpeg
from edgetl.errors import ImageError
from edgetl.spec import Spec

warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision are deprecated")


def usable(device: str = "cuda") -> bool:
    """torch and torchvision with a working `decode_jpeg` on `device` (tried on a tiny JPEG)."""
    try:
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        if device.startswith("cuda") and not torch.cuda.is_available():
            return False
        ok, jpeg = opencv().imencode(".jpg", np.full((8, 8, 3), 128, np.uint8))
        decode_jpeg([torch.from_numpy(jpeg.ravel())], mode=ImageReadMode.RGB, device=device)
        return True
    except Exception:  # noqa: BLE001 - any reason the GPU decoder cannot run here
        return False


def jpeg_info(data: bytes) -> dict | None:
    """One walk over a JPEG's markers: size, whether nvJPEG can take it (8-bit baseline or progressive,
    1 or 3 components) and the EXIF orientation (1-8). None when it is not a JPEG."""
    if data[:2] != b"\xff\xd8":
        return None
    info = {"size": None, "gpu": False, "orientation": 1}
    i, n = 2, len(data)
    while i + 4 < n and data[i] == 0xFF:
        marker, length = data[i + 1], int.from_bytes(data[i + 2:i + 4], "big")
        if marker == 0xFF:
            i += 1
            continue
        if marker == 0xDA:  # start of scan: no more headers
            break
        if marker == 0xE1 and data[i + 4:i + 10] == b"Exif\x00\x00":
            info["orientation"] = _tiff_orientation(data[i + 10:i + 2 + length])
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) and i + 10 < n:
            info["size"] = (int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big"))
            info["gpu"] = marker in (0xC0, 0xC1, 0xC2) and data[i + 4] == 8 and data[i + 9] in (1, 3)
        i += 2 + length
    return info


def exif_orientation(data: bytes) -> int:
    """The EXIF orientation (1-8) of a JPEG, 1 when it has none."""
    info = jpeg_info(data)
    return info["orientation"] if info else 1


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
    """Apply an EXIF orientation to a (…)×C×H×W tensor (what a viewer shows)."""
    if orientation in (5, 6, 7, 8):
        chw = chw.transpose(-1, -2)
    flips = {2: (-1,), 3: (-1, -2), 4: (-2,), 6: (-1,), 7: (-1, -2), 8: (-2,)}.get(orientation)
    return chw.flip(flips) if flips else chw


def resize_crop(nchw, spec: Spec):
    """`preprocess.resize_crop` on uint8 N×C×H×W tensors of one size (any device) → uint8 N×H×W×3."""
    import torch
    import torch.nn.functional as F

    squeeze = nchw.dim() == 3
    x = nchw[None] if squeeze else nchw
    top, left, ch, cw = crop_box(x.shape[2], x.shape[3], spec)
    region = x[:, :, top:top + ch, left:left + cw]
    out_h, out_w = spec.input_size
    if (ch, cw) == (out_h, out_w):
        y = region.permute(0, 2, 3, 1)
    else:
        f = region.float()
        shrink = out_h / ch
        if shrink < 0.5:
            f = F.interpolate(f, size=(out_h, out_w), mode="area")
        elif shrink < 1:
            f = F.interpolate(f, size=(out_h, out_w), mode="bilinear", align_corners=False, antialias=False)
        else:
            f = F.interpolate(f, size=(out_h, out_w), mode="bicubic", align_corners=False)
        y = f.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return y[0] if squeeze else y


def reduce(nchw, spec: Spec):
    """What the CPU path's reduced JPEG decoding does (1/2, 1/4 or 1/8 scale when the photo is that much
    larger than needed): the same factor, by block averages, so the crop lands on the same pixels."""
    import torch
    import torch.nn.functional as F

    h, w = nchw.shape[-2:]
    for factor in (8, 4, 2):
        if min(h, w) // factor >= spec.resize_size:
            return F.avg_pool2d(nchw.float(), factor, ceil_mode=True).round_().to(torch.uint8)
    return nchw


class Decoder:
    """Batches of encoded photos → uint8 [N, H, W, 3] on `device`, with the CPU path as fallback.

    nvJPEG decodes the batch in one call; photos of the same size are then cropped and resized together
    (one resize per size, not per photo), so the Python work per photo stays small."""

    def __init__(self, spec: Spec, device: str = "cuda"):
        self.spec, self.device = spec, device
        self.on_cpu = 0  # photos that went through the CPU path

    def __call__(self, datas: list[bytes], names: list[str]):
        """(batch tensor of the photos that decoded, their indices in `datas`, [(index, reason)] of the rest)."""
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        h, w = self.spec.input_size
        out = torch.empty((len(datas), h, w, 3), dtype=torch.uint8, device=self.device)
        done = [False] * len(datas)
        errors: list[tuple[int, str]] = []
        gpu, orientation = [], {}
        for i, data in enumerate(datas):
            try:
                info = jpeg_info(data)
                size = info["size"] if info else header_size(data, names[i])
                if size and size[0] * size[1] > MAX_PIXELS:
                    raise ImageError(f"{names[i]}: {size[0]}x{size[1]} pixels is over the limit of {MAX_PIXELS:,}")
                if info and info["gpu"] and not truncated_jpeg(data):
                    gpu.append(i)
                    orientation[i] = info["orientation"]
                else:
                    out[i] = self._cpu(data, names[i])
                    done[i] = True
            except ImageError as e:
                errors.append((i, str(e)))
        if gpu:
            tensors = [torch.frombuffer(bytearray(datas[i]), dtype=torch.uint8) for i in gpu]
            try:
                decoded = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device)
            except RuntimeError:  # one photo the GPU decoder refuses: decode them one by one
                decoded = [self._one(t) for t in tensors]
            groups: dict[tuple, list] = {}
            for i, img in zip(gpu, decoded):
                if img is None:
                    try:
                        out[i] = self._cpu(datas[i], names[i])
                        done[i] = True
                    except ImageError as e:
                        errors.append((i, str(e)))
                    continue
                img = orient(img, orientation[i])
                groups.setdefault(tuple(img.shape), []).append((i, img))
            for members in groups.values():
                idx = [i for i, _ in members]
                out[idx] = resize_crop(reduce(torch.stack([img for _, img in members]), self.spec), self.spec)
                for i in idx:
                    done[i] = True
        ok = [i for i in range(len(datas)) if done[i]]
        if not ok:
            return None, [], sorted(errors)
        batch = out if len(ok) == len(datas) else out[ok].contiguous()
        return batch, ok, sorted(errors)

    def _one(self, t):
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            return decode_jpeg(t, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            return None

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
    """onnxruntime on CUDA fed from torch CUDA tensors: the input is bound where it lies (no copy through
    the host), the output is allocated on the GPU by onnxruntime and copied back once."""

    def __init__(self, sess):
        self.sess = sess
        self.inp = sess.get_inputs()[0].name
        self.out = sess.get_outputs()[0].name

    def __call__(self, x) -> np.ndarray:
        import torch

        b = self.sess.io_binding()
        dev = x.device.index or 0
        b.bind_input(self.inp, "cuda", dev, np.uint8, tuple(x.shape), x.data_ptr())
        b.bind_output(self.out, "cuda", dev)
        torch.cuda.current_stream(x.device).synchronize()  # the input is written
        self.sess.run_with_iobinding(b)
        return b.copy_outputs_to_cpu()[0]
