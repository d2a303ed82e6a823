import struct
import zlib

import numpy as np
import pytest
from conftest import encode, photo
from PIL import Image

from edgetl.spec import Spec
from edgetl.data.preprocess import decode, frame_to_input, load_image, resize_crop
from edgetl.errors import ImageError

SPEC = Spec.from_crop_pct((64, 64), 0.875, (0.5,) * 3, (0.5,) * 3)


def test_spec_round_trips_through_json():
    s = Spec.from_crop_pct((240, 240), 0.882, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert Spec.from_json(s.to_json()) == s and s.resize_size == 272


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "LA", "I;16", "1"])
def test_odd_modes_become_rgb(mode):
    img = photo(3)
    conv = img.convert("I;16") if mode == "I;16" else img.convert(mode)
    data = encode(conv, "JPEG" if mode == "CMYK" else "PNG")
    out = load_image(data, SPEC)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    if mode in ("L", "I;16", "LA", "1"):  # grey stays grey
        assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])
    else:  # colour survives, in RGB order
        ref = load_image(encode(img, "PNG"), SPEC).astype(int)
        assert np.abs(out.astype(int) - ref).mean() < 40


def test_16_bit_png_keeps_its_range():
    arr = (np.linspace(0, 65535, 100 * 80).reshape(80, 100)).astype(np.uint16)
    out = decode(encode(Image.fromarray(arr), "PNG"))
    assert out.dtype == np.uint8 and out.max() >= 250 and out.min() <= 5


def test_channel_order_is_rgb():
    red = Image.new("RGB", (50, 40), (255, 0, 0))
    out = load_image(encode(red, "PNG"), SPEC)
    assert out[..., 0].min() == 255 and out[..., 1:].max() == 0


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (100, 50), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 50, 50))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    rotated = decode(encode(img, "JPEG", exif=exif.tobytes()))
    assert rotated.shape[:2] == (100, 50)  # now portrait
    assert rotated[:40].mean() > 200 and rotated[60:].mean() < 50  # white half on top


def test_tiny_image_is_upscaled():
    out = load_image(encode(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG"), SPEC)
    assert out.shape == (64, 64, 3) and tuple(out[32, 32]) == (10, 200, 30)


def test_huge_jpeg_is_decoded_at_reduced_scale():
    big = photo(1, size=(6000, 4000))
    data = encode(big, "JPEG", quality=80)
    out = load_image(data, SPEC)
    ref = resize_crop(np.asarray(big), SPEC)
    assert out.shape == (64, 64, 3)
    assert np.abs(out.astype(int) - ref.astype(int)).mean() < 8


def test_decompression_bomb_is_refused_from_its_header():
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))

    header = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0))
    with pytest.raises(ImageError, match="over the limit"):
        decode(header + chunk(b"IEND", b""), name="bomb.png")


@pytest.mark.parametrize("data, what", [
    (b"", "empty"),
    (b"this is not an image at all", "not a readable image"),
    (200, "truncated JPEG"),
    (0.7, "truncated JPEG"),
])
def test_bad_bytes_raise_one_line(data, what):
    if not isinstance(data, bytes):
        full = encode(photo(2, size=(400, 300)), "JPEG")
        data = full[:int(data if data > 1 else data * len(full))]
    with pytest.raises(ImageError, match=what) as e:
        load_image(data, SPEC)
    assert "\n" not in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="No such file"):
        load_image(tmp_path / "nope.jpg", SPEC)


def test_frames_and_files_see_the_same_pixels(tmp_path):
    img = photo(5, size=(640, 480))
    img.save(tmp_path / "f.png")
    bgr = np.asarray(img)[..., ::-1].copy()
    assert np.array_equal(frame_to_input(bgr, SPEC), load_image(tmp_path / "f.png", SPEC))


def test_non_square_input_size():
    s = Spec((48, 64), 48, (0.5,) * 3, (0.5,) * 3)
    assert resize_crop(np.zeros((300, 100, 3), np.uint8), s).shape == (48, 64, 3)
