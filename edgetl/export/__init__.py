"""Artifacts: PyTorch → ONNX with parity checks, pure graph functions, multi-depth export, fusion, quantization."""
