"""The ONNX contract: tensor names, metadata keys, opset and tolerances, defined here and nowhere else.

Every artifact edgetl writes (backbone.onnx, head.onnx, model.onnx) follows it; the runtime reads it.
"""

from __future__ import annotations

# One opset and one IR version on every artifact, so that onnx.compose can merge them.
OPSET = 17
IR_VERSION = 8

# Tensor names.
IMAGE = "image"  # uint8 [N, H, W, 3], RGB, at the size stored in metadata
EMBEDDING = "embedding"  # float32 [N, D]
ACTIVATION = "activation"  # float32 [N, C, h, w]: a trunk's output (the backbone cut before its last blocks)
PROBABILITIES = "probabilities"  # float32 [N, C], softmax inside the graph
BATCH_AXIS = "batch"

# Metadata keys (metadata_props of the ONNX model). Values are strings; JSON where structured.
KEY_FORMAT = "edgetl.format"  # "backbone" | "trunk" | "head" | "top" | "model"
KEY_VERSION = "edgetl.version"
KEY_BACKBONE = "edgetl.backbone"  # registry name
KEY_WEIGHTS_SHA256 = "edgetl.weights_sha256"
KEY_FINGERPRINT = "edgetl.backbone_fingerprint"  # what the embedding cache is namespaced by
KEY_EMBEDDING_DIM = "edgetl.embedding_dim"
KEY_PREPROCESS = "edgetl.preprocess"  # JSON of preprocess.Spec
KEY_CLASSES = "edgetl.classes"  # JSON list of class names, index order
KEY_HEAD = "edgetl.head"  # JSON description of the head
KEY_HEAD_SHA256 = "edgetl.head_sha256"
KEY_BACKBONE_SHA256 = "edgetl.backbone_sha256"
KEY_TRAINING = "edgetl.training"  # JSON summary of training
KEY_SPLIT = "edgetl.split"  # JSON {"note", "n_train", "n_val", "train", "val"}: content keys of the photos (data/split.py)
KEY_CUT = "edgetl.cut"  # JSON {"unfreeze": N, "block": k, "blocks": B, "shape": [C, h, w]} of a trunk
KEY_PRECISION = "edgetl.precision"  # "int8" | "fp16" on a quantized/converted model (absent: float32)
KEY_SOURCE_SHA256 = "edgetl.source_sha256"  # sha256 of the float32 model.onnx it was made from
KEY_CALIBRATION = "edgetl.calibration"  # JSON: method, images, reduce_range, nodes kept in float...
KEY_DEPTHS = "edgetl.depths"  # JSON [{"name", "start", "dim"}]: the columns of each depth of a multi-depth backbone
KEY_GATE = "edgetl.gate"  # JSON: the gate's measured accuracy, agreement and latency figures

FORMAT_BACKBONE = "backbone"
FORMAT_HEAD = "head"
FORMAT_TRUNK = "trunk"  # image → activation (frozen part)
FORMAT_TOP = "top"  # activation → probabilities (trained blocks + head)
FORMAT_MODEL = "model"

# Parity tolerances (max abs difference) for the checks run before anything is written.
EXPORT_ATOL = 1e-4  # onnxruntime vs PyTorch, backbone embeddings
HEAD_ATOL = 1e-5  # onnxruntime vs PyTorch, head probabilities
FUSE_ATOL = 1e-5  # fused model vs backbone-then-head, probabilities
