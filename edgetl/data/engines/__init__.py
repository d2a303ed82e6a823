"""Where `embed` runs: here ("local", `data.embed.embed_folder`'s own pipeline) or on a Ray cluster
("ray", `data.engines.ray`). Both call the same per-image preprocessing and inference and fill the
same content-addressed cache."""

from __future__ import annotations

import dataclasses

ENGINES = ("local", "ray")


@dataclasses.dataclass(frozen=True)
class Engine:
    """How `embed_folder` runs, and how it reaches photos in object storage.

    name: "local" or "ray". address: the Ray cluster ("auto": one already running on this machine,
    "ray://HOST:10001": Ray Client, HOST:PORT; None: the one this process is connected to, else a
    new local one for the run). workers: Ray workers, each holding one onnxruntime session (None:
    one per CPU of the cluster, or per GPU share). gpus_per_worker: > 0 runs onnxruntime on CUDA in
    the workers. endpoint_url: an S3-compatible store for s3:// data (else $AWS_ENDPOINT_URL, else AWS).
    """

    name: str = "local"
    address: str | None = None
    workers: int | None = None
    gpus_per_worker: float = 0.0
    endpoint_url: str | None = None
