"""Artifacts: PyTorch → ONNX with parity checks, fusion into one model; each verified before it is written."""
