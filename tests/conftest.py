import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("EDGETL_DATASETS", ROOT / "datasets"))
HYMENOPTERA = DATASETS / "hymenoptera_data"
PETS = DATASETS / "oxford_pets37_sample"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared dataset not found: {path} (set EDGETL_DATASETS)")
    return path


@pytest.fixture(scope="session")
def hymenoptera() -> Path:
    return need(HYMENOPTERA)


@pytest.fixture(scope="session")
def pets() -> Path:
    return need(PETS)


def photo(seed: int = 0, size=(120, 90)) -> Image.Image:
    """A small synthetic RGB picture with structure (gradients and a blob), deterministic."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([(x * (1 + seed % 3) * 255 // w), (y * 255 // h), ((x + y + 40 * seed) % 256)], -1)
    cy, cx = rng.integers(0, h), rng.integers(0, w)
    img[(y - cy) ** 2 + (x - cx) ** 2 < (min(w, h) // 4) ** 2] = rng.integers(0, 256, 3)
    return Image.fromarray(img.astype(np.uint8))


def encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture
def make_dataset(tmp_path):
    """make_dataset({'cats': 5, 'dogs': 4}, split=None) → a folder of synthetic JPEGs by class."""

    def make(counts: dict, root: Path | None = None, split: str | None = None, seed: int = 0) -> Path:
        root = root or tmp_path / "data"
        for ci, (cls, n) in enumerate(counts.items()):
            d = root / split / cls if split else root / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                # class-dependent colour shift so that classes are separable
                img = np.asarray(photo(seed * 1000 + ci * 100 + i)).astype(np.int16)
                img[..., ci % 3] = np.clip(img[..., ci % 3] + 90, 0, 255)
                Image.fromarray(img.astype(np.uint8)).save(d / f"img_{i:03d}.jpg", quality=90)
        return root

    return make


@pytest.fixture(scope="session")
def tiny_backbone():
    from edgetl import backbones

    return backbones.get("tiny_test")


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory, tiny_backbone):
    from edgetl.export import torch_onnx as export

    out = tmp_path_factory.mktemp("tiny") / "backbone.onnx"
    export.export_backbone(tiny_backbone, out)
    return out


@pytest.fixture(scope="session")
def lite0_onnx(tmp_path_factory):
    from edgetl import backbones
    from edgetl.export import torch_onnx as export

    out = tmp_path_factory.mktemp("lite0") / "backbone.onnx"
    export.export_backbone(backbones.get("efficientnet_lite0"), out)
    return out
