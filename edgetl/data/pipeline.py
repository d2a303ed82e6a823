"""Run a function over items in a thread pool, in order, with a bounded window (memory stays flat).

Decoding (OpenCV releases the GIL) thus overlaps with onnxruntime inference on the caller's thread.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import os
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np

from edgetl.data.preprocess import load_image
from edgetl.errors import ImageError

T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    return (os.cpu_count() or 1) + 1  # one more than cores: file reads wait on I/O


def prefetch_map(fn: Callable[[T], R], items: Iterable[T], workers: int | None = None,
                 window: int = 64) -> Iterator[tuple[T, R]]:
    """Yield (item, fn(item)) in input order; at most `window` items are in flight."""
    with cf.ThreadPoolExecutor(workers or default_workers(), thread_name_prefix="edgetl-decode") as pool:
        inflight: collections.deque = collections.deque()
        it = iter(items)
        for item in it:
            inflight.append((item, pool.submit(fn, item)))
            if len(inflight) >= window:
                break
        while inflight:
            item, fut = inflight.popleft()
            nxt = next(it, _END)
            if nxt is not _END:
                inflight.append((nxt, pool.submit(fn, nxt)))
            yield item, fut.result()


_END = object()


def image_batches(paths: list, spec, batch_size: int = 32, workers: int | None = None, path=None):
    """Yield (paths, uint8 [n,H,W,3] or None, errors) batches; errors is a list of (path, one-line reason).

    `paths` may hold any items when `path` maps an item to its file path; items come back as given.
    """
    def load(p):
        try:
            return load_image(path(p) if path else p, spec), None
        except ImageError as e:
            return None, str(e)

    ok_paths, arrays, errors = [], [], []
    for p, (arr, err) in prefetch_map(load, paths, workers, window=max(2 * batch_size, 16)):
        if err:
            errors.append((p, err))
        else:
            ok_paths.append(p)
            arrays.append(arr)
        if len(arrays) >= batch_size:
            yield ok_paths, np.stack(arrays), errors
            ok_paths, arrays, errors = [], [], []
    if arrays or errors:
        yield ok_paths, (np.stack(arrays) if arrays else None), errors
