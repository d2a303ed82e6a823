"""The GPU decoding path's pixel policy, run here with torchvision's CPU decoder (same code after decoding)."""

import numpy as np
import pytest
from conftest import encode, photo
from PIL import Image

from edgetl.data import gpu
from edgetl.spec import Spec
from edgetl.data.preprocess import load_image

SPEC = Spec.from_crop_pct((224, 224), 0.875, (0.5,) * 3, (0.5,) * 3)


@pytest.fixture(scope="module")
def decoder():
    if not gpu.usable("cpu"):
        pytest.skip("torchvision cannot decode JPEGs here")
    return gpu.Decoder(SPEC, "cpu")


def test_every_exif_orientation_matches_the_cpu_path(decoder):
    img = photo(3, size=(160, 100))
    datas = []
    for o in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = o
        datas.append(encode(img, "JPEG", exif=exif.tobytes(), quality=95))
    batch, ok, errors = decoder(datas, [f"o{o}" for o in range(1, 9)])
    assert ok == list(range(8)) and errors == []
    for j, data in enumerate(datas):
        assert gpu.exif_orientation(data) == j + 1
        assert np.abs(batch[j].numpy().astype(int) - load_image(data, SPEC).astype(int)).mean() < 0.01


def test_real_photos_within_the_stated_tolerance(decoder, real_photo_files):
    paths = real_photo_files
    d = gpu.compare_with_cpu(paths, SPEC, "cpu")
    assert d["images"] == len(paths)
    assert d["mean_abs"] <= 0.5 and d["p99_abs"] <= 2  # grey levels out of 255


def test_what_it_cannot_take_goes_to_the_cpu_path_or_is_reported(decoder):
    png = encode(photo(1), "PNG")
    cmyk = encode(photo(2).convert("CMYK"), "JPEG")
    batch, ok, errors = decoder([png, b"not an image", cmyk], ["a.png", "b.jpg", "c.jpg"])
    assert ok == [0, 2] and [i for i, _ in errors] == [1] and "b.jpg" in errors[0][1]
    for j, data in zip(range(2), (png, cmyk)):
        assert np.abs(batch[j].numpy().astype(int) - load_image(data, SPEC).astype(int)).mean() < 0.5
