"""edgetl: transfer learning to the edge — frozen ImageNet backbone, cached embeddings, one ONNX model."""

__version__ = "0.1.0"
