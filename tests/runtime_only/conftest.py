"""Blocks the training stack before anything imports edgetl: this folder's tests see what a device with
only onnxruntime, numpy and OpenCV sees. Needs no PIL. Run by tests/test_runtime_only.py, which makes
the model, photos and video first and passes them in EDGETL_RT_MODEL, EDGETL_RT_DATA, EDGETL_RT_VIDEO."""

import importlib.abc
import os
import sys
from pathlib import Path

import pytest

BLOCKED = ("torch", "torchvision", "timm", "onnx", "PIL", "matplotlib")


class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: runtime-only test run)", name=name)
        return None


for name in list(sys.modules):
    if name.split(".")[0] in BLOCKED:
        raise RuntimeError(f"{name} was imported before the blocker")
sys.meta_path.insert(0, Blocker())


def given(var: str) -> Path:
    value = os.environ.get(var)
    if not value:
        pytest.fail(f"{var} is not set: run these tests through tests/test_runtime_only.py")
    return Path(value)


@pytest.fixture(scope="session")
def model() -> Path:
    return given("EDGETL_RT_MODEL")


@pytest.fixture(scope="session")
def data() -> Path:
    return given("EDGETL_RT_DATA")


@pytest.fixture(scope="session")
def video() -> Path:
    return given("EDGETL_RT_VIDEO")
