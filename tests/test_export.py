import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edgetl import contract as C
from edgetl.spec import Spec
from edgetl.data.preprocess import load_image
from edgetl.errors import ParityError
from edgetl.export import torch_onnx as export


def _check_file(path, backbone, images):
    """The written file, reloaded, matches PyTorch on batch sizes other than the export one."""
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta[C.KEY_FORMAT] == C.FORMAT_BACKBONE
    assert meta[C.KEY_BACKBONE] == backbone.name
    assert meta[C.KEY_FINGERPRINT] == backbone.fingerprint
    assert meta[C.KEY_WEIGHTS_SHA256] == backbone.weights_sha256
    assert int(meta[C.KEY_EMBEDDING_DIM]) == backbone.dim
    assert Spec.from_json(meta[C.KEY_PREPROCESS]) == backbone.spec
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == C.IMAGE and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert out.name == C.EMBEDDING
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    module = export.image_module(backbone)
    worst = 0.0
    for n in (1, 3, 5):
        batch = np.stack([load_image(p, backbone.spec) for p in images[:n]])
        got = sess.run(None, {C.IMAGE: batch})[0]
        with torch.no_grad():
            ref = module(torch.from_numpy(batch)).numpy()
        assert got.shape == (n, backbone.dim)
        worst = max(worst, float(np.abs(got - ref).max()))
    return worst


def test_tiny_export_parity_on_real_photos(tiny_onnx, tiny_backbone, real_photo_files):
    assert _check_file(tiny_onnx, tiny_backbone, real_photo_files[:5]) <= C.EXPORT_ATOL


@pytest.mark.slow
def test_default_backbone_export_parity_on_real_photos(lite0_onnx, real_photo_files):
    from edgetl import backbones

    worst = _check_file(lite0_onnx, backbones.get(), real_photo_files[:5])
    print(f"efficientnet_lite0 max abs diff {worst:.2e}")
    assert worst <= C.EXPORT_ATOL


def test_embedding_is_normalised_inside_the_graph(tiny_onnx, tiny_backbone):
    """Feeding raw uint8 to the graph equals feeding normalised floats to the PyTorch features."""
    x = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    got = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"]).run(None, {C.IMAGE: x})[0]
    mean, std = np.array(tiny_backbone.spec.mean), np.array(tiny_backbone.spec.std)
    norm = ((x / 255.0 - mean) / std).transpose(0, 3, 1, 2).astype(np.float32)
    with torch.no_grad():
        ref = tiny_backbone.model(torch.from_numpy(norm)).numpy()
    assert np.abs(got - ref).max() < 1e-4


def test_failed_parity_writes_nothing(tmp_path, tiny_backbone):
    out = tmp_path / "b.onnx"
    with pytest.raises(ParityError, match="nothing written"):
        export.export_backbone(tiny_backbone, out, atol=-1.0)
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_leaves_no_partial_file(tmp_path):
    """Interrupt real exports at several moments: never a partial or temporary file."""
    interrupted = 0
    for delay in (2.0, 4.0, 6.0, 8.0):
        out = tmp_path / f"d{delay}" / "backbone.onnx"
        proc = subprocess.Popen([sys.executable, "-m", "edgetl.cli", "export-backbone", "-o", str(out)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=_default_sigint)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        leftovers = [p.name for p in out.parent.iterdir()] if out.parent.exists() else []
        assert "Traceback" not in err
        if out.exists():  # it had finished (the signal may then land in interpreter shutdown): whole
            onnx.checker.check_model(onnx.load(str(out)))
            assert leftovers == ["backbone.onnx"]
        else:
            assert proc.returncode == 130 and "interrupted" in err, (proc.returncode, err)
            assert leftovers == [], leftovers
            interrupted += 1
    assert interrupted >= 1


def test_opset_and_ir_version_are_the_contract(tiny_onnx):
    m = onnx.load(str(tiny_onnx))
    assert m.ir_version == C.IR_VERSION
    assert [o.version for o in m.opset_import if o.domain in ("", "ai.onnx")] == [C.OPSET]


def _default_sigint():
    """The test runner may start with SIGINT ignored (a background job); Ctrl-C must reach the child."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
