# CPU image: edgetl with its runtime. GPU users: start from an onnxruntime-gpu/CUDA image instead.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
RUN pip install --no-cache-dir torch torchvision --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY edgetl ./edgetl
RUN pip install --no-cache-dir .
WORKDIR /work
ENTRYPOINT ["edgetl"]
CMD ["--help"]
