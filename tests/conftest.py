"""Fixtures of the whole suite. Needs no PIL to be collected (Pillow is imported by the fixtures that draw
photos), and leaves tests/runtime_only to tests/test_runtime_only.py, which runs it without the training stack."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest

collect_ignore = ["runtime_only"]

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"  # bundled real photos: tests that need real photos always have these
DATASETS = Path(os.environ.get("EDGETL_DATASETS", ROOT / "datasets"))
HYMENOPTERA = DATASETS / "hymenoptera_data"
PETS = DATASETS / "oxford_pets37_sample"
# The shared photo sets are an extra: tests marked `datasets` run on them when $EDGETL_DATASETS holds them,
# and are not collected otherwise (deselected, not skipped: a fresh clone has all it needs).
SHARED = {"hymenoptera": HYMENOPTERA, "pets": PETS}
REAL_SETS = ["samples", *(["hymenoptera"] if HYMENOPTERA.exists() else [])]


def pytest_configure(config):
    config.addinivalue_line("markers", "datasets(*names): needs the shared photo sets under $EDGETL_DATASETS "
                                       "(hymenoptera, pets); deselected when they are not there")


def pytest_collection_modifyitems(config, items):
    missing = {n for n, p in SHARED.items() if not p.exists()}
    keep, drop = [], []
    for item in items:
        m = item.get_closest_marker("datasets")
        (drop if m is not None and set(m.args or SHARED) & missing else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_report_header(config):
    where = ", ".join(f"{n}: {'found' if p.exists() else 'not found'}" for n, p in SHARED.items())
    return f"shared photo sets ($EDGETL_DATASETS={DATASETS}): {where}; tests on the missing ones are deselected"


def need(path: Path) -> Path:
    if not path.exists():  # a test that uses a shared set should be marked datasets(...) and is then deselected
        pytest.skip(f"shared dataset not found: {path} (set EDGETL_DATASETS; mark the test datasets(...))")
    return path


@pytest.fixture(scope="session")
def hymenoptera() -> Path:
    return need(HYMENOPTERA)


@pytest.fixture(scope="session")
def pets() -> Path:
    return need(PETS)


@pytest.fixture(scope="session", params=REAL_SETS)
def real_photo_files(request) -> list[Path]:
    """Real photos: the bundled samples (30: the held-back ones and every 4th of samples/pets), and the
    shared hymenoptera val/ photos when they are there."""
    if request.param == "samples":
        return sorted((SAMPLES / "pets-held-back").rglob("*.jpg")) + sorted((SAMPLES / "pets").rglob("*.jpg"))[::4]
    return sorted((HYMENOPTERA / "val").rglob("*.jpg"))


@pytest.fixture(scope="session", params=REAL_SETS)
def real_folder(request) -> tuple[str, Path]:
    """(name, a real photo folder of class folders): samples/pets always, hymenoptera when it is there."""
    return request.param, (SAMPLES / "pets" if request.param == "samples" else HYMENOPTERA)


def photo(seed: int = 0, size=(120, 90)):
    """A small synthetic RGB picture with structure (gradients and a blob), deterministic."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([(x * (1 + seed % 3) * 255 // w), (y * 255 // h), ((x + y + 40 * seed) % 256)], -1)
    cy, cx = rng.integers(0, h), rng.integers(0, w)
    img[(y - cy) ** 2 + (x - cx) ** 2 < (min(w, h) // 4) ** 2] = rng.integers(0, 256, 3)
    return Image.fromarray(img.astype(np.uint8))


def encode(img, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture
def make_dataset(tmp_path):
    """make_dataset({'cats': 5, 'dogs': 4}, split=None) → a folder of synthetic JPEGs by class."""

    def make(counts: dict, root: Path | None = None, split: str | None = None, seed: int = 0) -> Path:
        from PIL import Image

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


def train_tiny(tmp: Path, tiny_onnx, source: Path, per_class: int) -> tuple[Path, Path]:
    """A real fused model.onnx (tiny backbone) trained by `edgetl train-head` on the first `per_class` photos
    of each class folder of `source`; (model path, the photo folder). train-head records its split in it."""
    import shutil

    from click.testing import CliRunner

    from edgetl.cli import main

    data = tmp / "data"
    for folder in sorted(p for p in source.iterdir() if p.is_dir()):
        (data / folder.name).mkdir(parents=True)
        for src in sorted(folder.glob("*.jpg"))[:per_class]:
            shutil.copyfile(src, data / folder.name / src.name)
    r = CliRunner().invoke(main, ["train-head", str(data), "--backbone", str(tiny_onnx), "--cache", str(tmp / "cache"),
                                  "-o", str(tmp / "out")])
    assert r.exit_code == 0, r.output
    return tmp / "out" / "model.onnx", data
