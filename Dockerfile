# CPU image with the whole tool (training and runtime): PyTorch's CPU wheels, then edgetl[train].
# A device image needs only the runtime: replace the two pip lines by `pip install --no-cache-dir .`.
# GPU users: start from an NVIDIA CUDA image and install onnxruntime-gpu instead of onnxruntime.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
RUN pip install --no-cache-dir torch torchvision --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY edgetl ./edgetl
RUN pip install --no-cache-dir ".[train]"
WORKDIR /work
ENTRYPOINT ["edgetl"]
CMD ["--help"]
