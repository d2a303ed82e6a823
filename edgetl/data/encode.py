"""The per-batch embedding function of every engine: `prepare` turns one image's encoded bytes into the
pixels the backbone sees (any view), `infer` runs a batch of them, and `embed_encoded` is the plain
function built from the two ((session, spec, encoded images, names) → keys, float32 embeddings, errors;
no global state) that the local engine's pipeline and the Ray engine's workers both run. `embed_batch`
embeds paths, bytes or prepared arrays, for tests and scripts.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from edgetl import contract as C
from edgetl.data.cache import image_key
from edgetl.data.preprocess import augment_view, decode_bgr, load_image, view_seed
from edgetl.errors import ImageError
from edgetl.ort import output_dim
from edgetl.spec import Spec


def embed_batch(sess, spec: Spec, images) -> np.ndarray:
    """Embed a batch: `images` are paths, encoded bytes, or uint8 [H,W,3] arrays already preprocessed.

    Returns float32 [N, D]. Raises ImageError on the first image that cannot be decoded.
    """
    arrays = [im if isinstance(im, np.ndarray) else load_image(im, spec) for im in images]
    return infer(sess, np.stack(arrays))


def infer(sess, batch: np.ndarray) -> np.ndarray:
    """One onnxruntime call: uint8 [N,H,W,3] → float32 [N, D] (a trunk's activation maps flattened)."""
    out = sess.run([sess.get_outputs()[0].name], {C.IMAGE: batch})[0]
    return out.reshape(len(out), -1)


def prepare(data: bytes, spec: Spec, view: str = "center", key: bytes | None = None, name: str = "image") -> np.ndarray:
    """The pixels the backbone sees for one encoded image: uint8 RGB [H,W,3], the deployment crop
    (`load_image`) or, for view "aug<i>", that view's seeded augmentation (seeded by the content
    `key`). ImageError (one line, naming it) when it cannot be decoded."""
    if view == "center":
        return load_image(data, spec, name)
    return augment_view(decode_bgr(data, spec.resize_size, name), spec, view_seed(key or image_key(data), view))


@dataclasses.dataclass
class Embedded:
    """What `embed_encoded` made of a batch of encoded images (indices refer to its input)."""

    keys: list[bytes | None]  # the content key of every input; None where it could not be read
    emb: np.ndarray  # float32 [len(new), D]: row j is the embedding of input new[j]
    new: list[int]  # inputs embedded now (not in `known`, not a repeat of an earlier input)
    errors: list[tuple[int, str]]  # (input index, one-line reason): unreadable images, never embedded


def embed_encoded(sess, spec: Spec, blobs, names, view: str = "center", known=(), pool=None) -> Embedded:
    """The per-batch function of every engine: encoded images (bytes, or an ImageError raised while
    reading them) → content keys, float32 embeddings of those not in `known`, and one line per
    image that cannot be used. `pool` (an Executor) decodes in its threads; None decodes here."""
    keys: list[bytes | None] = [None] * len(blobs)
    errors: list[tuple[int, str]] = []
    todo: list[int] = []
    seen: set[bytes] = set()
    for i, data in enumerate(blobs):
        if isinstance(data, Exception):
            errors.append((i, str(data)))
            continue
        keys[i] = k = image_key(data)
        if k not in known and k not in seen:
            seen.add(k)
            todo.append(i)

    def one(i):
        try:
            return prepare(blobs[i], spec, view, keys[i], str(names[i]))
        except ImageError as e:
            return e

    arrays, new = [], []
    for i, arr in zip(todo, pool.map(one, todo) if pool is not None else map(one, todo)):
        if isinstance(arr, ImageError):
            errors.append((i, str(arr)))
            keys[i] = None
        else:
            arrays.append(arr)
            new.append(i)
    errors.sort()
    emb = infer(sess, np.stack(arrays)) if arrays else np.zeros((0, output_dim(sess)), np.float32)
    return Embedded(keys, emb, new, errors)
