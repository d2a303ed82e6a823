"""The embedding cache: content-addressed, incremental, crash-safe.

On-disk format (version 1), read by later commands and by other engines:

    CACHE/
      <namespace>/                  one folder per (backbone fingerprint × preprocessing × view)
        namespace.json              {"format": 1, "backbone": NAME, "fingerprint": HEX, "preprocess": SPEC,
                                     "view": VIEW, "dim": D, "dtype": "float32"}
        shard-<id>.npz              numpy .npz with two arrays:
                                      keys  uint8 [n, 32]  SHA-256 of the image file's bytes
                                      emb   float32/float16 [n, D]  (row i is the embedding of keys[i])

* The namespace is the first 16 hex digits of SHA-256 over the fingerprint, the preprocessing spec
  and the view, so two backbones (or two preprocessings) never share entries.
* A shard is written as a temporary file and renamed into place: a reader sees whole shards only.
  Killing a writer loses at most the batch it was writing.
* Shards may repeat a key (after a crash during compaction); any copy is valid.
* `compact()` merges small shards into one; it writes the merged shard before removing the old ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from pathlib import Path

import numpy as np

from edgetl.errors import CacheError
from edgetl.files import writable_dir, write_bytes

FORMAT = 1
KEY_BYTES = 32


def image_key(data: bytes) -> bytes:
    """The cache key of an image: SHA-256 of its encoded bytes (renames and moves change nothing)."""
    return hashlib.sha256(data).digest()


def namespace_id(fingerprint: str, preprocess_json: str, view: str = "center") -> str:
    return hashlib.sha256(f"{fingerprint}|{preprocess_json}|{view}".encode()).hexdigest()[:16]


class Namespace:
    """One folder of the cache: the embeddings of one backbone under one preprocessing and view."""

    def __init__(self, root: str | os.PathLike, backbone: str, fingerprint: str, preprocess_json: str,
                 dim: int, view: str = "center", dtype: str = "float32"):
        self.meta = {"format": FORMAT, "backbone": backbone, "fingerprint": fingerprint,
                     "preprocess": json.loads(preprocess_json), "view": view, "dim": int(dim), "dtype": dtype}
        self.id = namespace_id(fingerprint, preprocess_json, view)
        self.dir = Path(root) / self.id
        self.dim = int(dim)
        self.dtype = np.dtype(dtype)
        self._keys: set[bytes] | None = None

    def open(self, create: bool = True) -> "Namespace":
        """Check (or create) namespace.json; CacheError if the folder belongs to something else."""
        meta_path = self.dir / "namespace.json"
        if meta_path.exists():
            try:
                found = json.loads(meta_path.read_text())
            except (OSError, ValueError) as e:
                raise CacheError(f"{meta_path}: unreadable ({e})") from None
            if found != self.meta:
                diff = sorted(k for k in set(found) | set(self.meta) if found.get(k) != self.meta.get(k))
                raise CacheError(f"cache {self.dir} was made for another backbone or preprocessing "
                                 f"(differs in {', '.join(diff)})")
        elif create:
            writable_dir(self.dir)
            write_bytes(meta_path, json.dumps(self.meta, indent=1).encode())
        else:
            raise CacheError(f"no cache for backbone {self.meta['backbone']} in {self.dir.parent}")
        self._sweep()
        return self

    def _sweep(self, age_s: float = 600) -> None:
        """Remove temporary files left by a killed writer (old enough not to belong to a live one)."""
        now = time.time()
        for tmp in self.dir.glob(".*.tmp"):
            try:
                if now - tmp.stat().st_mtime > age_s:
                    tmp.unlink()
            except OSError:
                pass

    def shards(self) -> list[Path]:
        return sorted(self.dir.glob("shard-*.npz"))

    def keys(self) -> set[bytes]:
        """All keys present (reads only the small key arrays)."""
        if self._keys is None:
            found: set[bytes] = set()
            for shard in self.shards():
                with np.load(shard) as z:
                    found.update(bytes(k) for k in z["keys"])
            self._keys = found
        return self._keys

    def add(self, keys: list[bytes], emb: np.ndarray) -> Path:
        """Write one shard atomically."""
        if emb.shape != (len(keys), self.dim):
            raise CacheError(f"embeddings of shape {emb.shape} do not fit this cache (dim {self.dim})")
        arr = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), KEY_BYTES)
        path = self.dir / f"shard-{uuid.uuid4().hex}.npz"
        import io

        buf = io.BytesIO()
        np.savez(buf, keys=arr, emb=emb.astype(self.dtype, copy=False))
        write_bytes(path, buf.getvalue())
        if self._keys is not None:
            self._keys.update(keys)
        return path

    def load(self, keys: list[bytes] | None = None) -> tuple[list[bytes], np.ndarray]:
        """Embeddings for `keys` (in that order), or every entry when keys is None. CacheError if any is missing."""
        rows: dict[bytes, np.ndarray] = {}
        want = None if keys is None else set(keys)
        for shard in self.shards():
            with np.load(shard) as z:
                ks, emb = z["keys"], z["emb"]
            for i, k in enumerate(ks):
                kb = bytes(k)
                if want is None or kb in want:
                    rows[kb] = emb[i]
        order = list(rows) if keys is None else keys
        missing = [k for k in order if k not in rows]
        if missing:
            raise CacheError(f"{len(missing)} images are not in the cache {self.dir}; run `edgetl embed` first")
        out = np.stack([rows[k] for k in order]) if order else np.zeros((0, self.dim), self.dtype)
        return order, out.astype(np.float32, copy=False)

    def compact(self, min_shards: int = 64, chunk_bytes: int = 64 << 20) -> None:
        """Merge small shards into shards of about `chunk_bytes` when there are many (re-runs then read
        few files). Memory stays bounded by one chunk; each merged shard is written before its sources go."""
        small = [s for s in self.shards() if s.stat().st_size < chunk_bytes // 4]
        if len(small) < min_shards:
            return
        group: list[tuple[Path, np.ndarray, np.ndarray]] = []

        def merge():
            if len(group) > 1:
                keys = np.concatenate([k for _, k, _ in group])
                self.add([bytes(k) for k in keys], np.concatenate([e for _, _, e in group]))
                for s, _, _ in group:
                    s.unlink(missing_ok=True)
            group.clear()

        size = 0
        for shard in small:
            with np.load(shard) as z:
                group.append((shard, z["keys"], z["emb"]))
            size += group[-1][2].nbytes
            if size >= chunk_bytes:
                merge()
                size = 0
        merge()


def open_for_backbone(root: str | os.PathLike, backbone_meta: dict[str, str], view: str = "center",
                      create: bool = True) -> Namespace:
    """The namespace for an exported backbone.onnx, from its metadata."""
    from edgetl import contract as C

    trunk = backbone_meta.get(C.KEY_FORMAT) == C.FORMAT_TRUNK
    try:
        ns = Namespace(root, backbone_meta[C.KEY_BACKBONE], backbone_meta[C.KEY_FINGERPRINT],
                       backbone_meta[C.KEY_PREPROCESS], int(backbone_meta[C.KEY_EMBEDDING_DIM]), view,
                       "float16" if trunk else "float32")  # activation maps are large: half precision
    except KeyError as e:
        raise CacheError(f"the backbone file lacks edgetl metadata {e}") from None
    own = Path(root) / "namespace.json"
    if own.exists():  # `root` is itself one namespace folder: use it only if it is this backbone's
        try:
            found = json.loads(own.read_text())
        except (OSError, ValueError):
            found = {}
        if found.get("fingerprint") != ns.meta["fingerprint"] or found.get("view") != view:
            raise CacheError(f"cache {root} holds embeddings of backbone {found.get('backbone', '?')} "
                             f"({str(found.get('fingerprint', '?'))[:12]}), not of {ns.meta['backbone']} "
                             f"({ns.meta['fingerprint'][:12]}); point --cache at the cache root instead")
        ns.dir = Path(root)
    return ns.open(create)
