"""The embedding cache: content-addressed, incremental, crash-safe, and checked on every read.

On-disk format (version 2), read by later commands and by other engines:

    CACHE/
      .edgetl                       marker: edgetl's own folder (photo scans skip it)
      <namespace>/                  one folder per (backbone graph × preprocessing × view)
        namespace.json              {"format": 2, "backbone": NAME, "fingerprint": HEX, "graph_sha256": HEX,
                                     "preprocess": SPEC, "view": VIEW, "dim": D, "dtype": "float32"}
        shard-<sha>.npz             numpy .npz with two arrays:
                                      keys  uint8 [n, 32]  SHA-256 of the image file's bytes
                                      emb   float32/float16 [n, D]  (row i is the embedding of keys[i])
                                    <sha>: the first 32 hex digits of the SHA-256 of the file itself
        quarantine/                 shards that failed their checks, set aside (never read again)

* The namespace is the first 16 hex digits of SHA-256 over the backbone's fingerprint, the SHA-256
  of its ONNX graph (so a file that only claims another backbone's fingerprint gets its own
  namespace), the preprocessing spec, the view and the format, so two backbones never share entries.
* A shard is written as a temporary file and renamed into place: a reader sees whole shards only.
  Killing a writer loses at most the batch it was writing.
* Every read checks a shard against the checksum in its name, its arrays' shapes and dtypes against
  namespace.json; a shard that fails is moved to quarantine/ (reported in one line) and its entries
  are simply not there any more, so `embed` computes them again.
* Shards may repeat a key (after a crash during compaction, or two writers); any copy is valid.
* `compact()` merges small shards into one under a lock (one compactor at a time); it writes the
  merged shard before removing the old ones, and readers tolerate shards that vanish meanwhile.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import time
from pathlib import Path

import numpy as np

from edgetl import contract as C
from edgetl.errors import CacheError
from edgetl.files import mark_output, writable_dir, write_bytes

FORMAT = 2
KEY_BYTES = 32


def image_key(data: bytes) -> bytes:
    """The cache key of an image: SHA-256 of its encoded bytes (renames and moves change nothing)."""
    return hashlib.sha256(data).digest()


def namespace_id(fingerprint: str, preprocess_json: str, view: str = "center", graph_sha256: str = "") -> str:
    blob = f"{fingerprint}|{graph_sha256}|{preprocess_json}|{view}|format{FORMAT}"
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class BadShard(Exception):
    pass


class Namespace:
    """One folder of the cache: the embeddings of one backbone under one preprocessing and view."""

    def __init__(self, root: str | os.PathLike, backbone: str, fingerprint: str, preprocess_json: str,
                 dim: int, view: str = "center", dtype: str = "float32", graph_sha256: str = ""):
        self.meta = {"format": FORMAT, "backbone": backbone, "fingerprint": fingerprint,
                     "graph_sha256": graph_sha256, "preprocess": json.loads(preprocess_json), "view": view,
                     "dim": int(dim), "dtype": dtype}
        self.id = namespace_id(fingerprint, preprocess_json, view, graph_sha256)
        self.dir = Path(root) / self.id
        self.dim = int(dim)
        self.dtype = np.dtype(dtype)
        self._keys: set[bytes] | None = None
        self.problems: list[str] = []  # one line per quarantined shard, for the caller to report
        self.index = None  # a data.index.FileIndex: shards verified before are not hashed again

    def open(self, create: bool = True) -> "Namespace":
        """Check (or create) namespace.json; CacheError if the folder belongs to something else."""
        meta_path = self.dir / "namespace.json"
        if meta_path.exists():
            try:
                found = json.loads(meta_path.read_text())
            except (OSError, ValueError) as e:
                raise CacheError(f"{meta_path}: unreadable ({e})") from None
            if found != self.meta:
                diff = sorted(k for k in set(found) | set(self.meta) if found.get(k) != self.meta.get(k)) \
                    if isinstance(found, dict) else ["everything"]
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
            with contextlib.suppress(OSError):
                if now - tmp.stat().st_mtime > age_s:
                    tmp.unlink()

    def shards(self) -> list[Path]:
        return sorted(self.dir.glob("shard-*.npz"))

    def _read(self, shard: Path, want_emb: bool = True) -> tuple[np.ndarray, np.ndarray | None] | None:
        """(keys, emb) of a shard after its checks; None if it vanished (another process compacted it).
        A shard that fails a check is quarantined and None is returned. A shard the file index has
        seen verified, unchanged, is not hashed again (and only its keys are read when that is all
        that is wanted)."""
        try:
            st = shard.stat()
        except FileNotFoundError:
            return None
        except OSError as e:
            return self._quarantine(shard, f"unreadable ({e.strerror})")
        if self.index is not None and self.index.shard_verified(shard, st):
            try:
                with np.load(shard, allow_pickle=False) as z:
                    keys = z["keys"]
                    emb = z["emb"] if want_emb else None
                if self._fits(keys, emb):
                    return keys, emb
            except FileNotFoundError:
                return None
            except Exception:  # noqa: BLE001 - changed since: the full check below decides
                pass
        try:
            data = shard.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            return self._quarantine(shard, f"unreadable ({e.strerror})")
        want = shard.stem.removeprefix("shard-")
        if hashlib.sha256(data).hexdigest()[:len(want)] != want or len(want) != 32:
            return self._quarantine(shard, "checksum mismatch" if len(want) == 32 else "not named by its checksum")
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                keys, emb = z["keys"], z["emb"]
        except Exception as e:  # noqa: BLE001 - any way a file can fail to be an .npz
            return self._quarantine(shard, f"not a valid shard ({type(e).__name__})")
        if not self._fits(keys, emb):
            return self._quarantine(shard, f"arrays of shape {keys.shape}/{emb.shape} {emb.dtype}, this cache holds "
                                           f"[n, {self.dim}] {self.dtype}")
        if self.index is not None:
            self.index.verified(shard, st)
        return keys, emb

    def _fits(self, keys: np.ndarray, emb: np.ndarray | None) -> bool:
        return (keys.dtype == np.uint8 and keys.ndim == 2 and keys.shape[1] == KEY_BYTES
                and (emb is None or (emb.dtype == self.dtype and emb.shape == (len(keys), self.dim))))

    def _quarantine(self, shard: Path, why: str) -> None:
        q = self.dir / "quarantine"
        with contextlib.suppress(OSError):
            q.mkdir(exist_ok=True)
            os.replace(shard, q / shard.name)
        self.problems.append(f"cache shard {shard.name} {why}: set aside in {q}; its entries are computed again")
        return None

    def _each(self, want_emb: bool = True):
        """(keys, emb) of every good shard; tolerates shards that vanish during the walk (re-lists)."""
        seen: set[Path] = set()
        for _ in range(5):
            vanished = False
            for shard in self.shards():
                if shard in seen:
                    continue
                got = self._read(shard, want_emb)
                if got is None:
                    vanished |= not shard.exists() and not (self.dir / "quarantine" / shard.name).exists()
                    continue
                seen.add(shard)
                yield got
            if not vanished:
                return

    def keys(self) -> set[bytes]:
        """All keys present (every shard checked once per process)."""
        if self._keys is None:
            found: set[bytes] = set()
            for ks, _ in self._each(want_emb=False):
                found.update(bytes(k) for k in ks)
            self._keys = found
        return self._keys

    def add(self, keys: list[bytes], emb: np.ndarray) -> Path:
        """Write one shard atomically, named by its checksum."""
        if emb.shape != (len(keys), self.dim):
            raise CacheError(f"embeddings of shape {emb.shape} do not fit this cache (dim {self.dim})")
        arr = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), KEY_BYTES)
        buf = io.BytesIO()
        np.savez(buf, keys=arr, emb=emb.astype(self.dtype, copy=False))
        data = buf.getvalue()
        path = self.dir / f"shard-{hashlib.sha256(data).hexdigest()[:32]}.npz"
        if not path.exists():
            write_bytes(path, data)
        if self._keys is not None:
            self._keys.update(keys)
        return path

    def load(self, keys: list[bytes] | None = None) -> tuple[list[bytes], np.ndarray]:
        """Embeddings for `keys` (in that order), or every entry when keys is None. CacheError if any is missing."""
        rows: dict[bytes, np.ndarray] = {}
        want = None if keys is None else set(keys)
        for ks, emb in self._each():
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
        few files). One compactor at a time (a lock; another simply skips); memory stays bounded by one
        chunk; each merged shard is written before its sources go."""
        with _try_lock(self.dir / ".compact.lock") as locked:
            if not locked:
                return
            small = []
            for s in self.shards():
                with contextlib.suppress(FileNotFoundError):
                    if s.stat().st_size < chunk_bytes // 4:
                        small.append(s)
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
                got = self._read(shard)
                if got is None:
                    continue
                group.append((shard, *got))
                size += group[-1][2].nbytes
                if size >= chunk_bytes:
                    merge()
                    size = 0
            merge()


@contextlib.contextmanager
def _try_lock(path: Path):
    """An exclusive advisory lock without waiting: yields True when held, False when another has it."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking, compaction still never loses entries
        yield True
        return
    try:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o666)
    except OSError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def open_for_backbone(root: str | os.PathLike, backbone_meta: dict[str, str], view: str = "center",
                      create: bool = True, graph_sha256: str = "") -> Namespace:
    """The namespace for an exported backbone.onnx, from its metadata and the hash of its graph."""
    trunk = backbone_meta.get(C.KEY_FORMAT) == C.FORMAT_TRUNK
    try:
        ns = Namespace(root, backbone_meta[C.KEY_BACKBONE], backbone_meta[C.KEY_FINGERPRINT],
                       backbone_meta[C.KEY_PREPROCESS], int(backbone_meta[C.KEY_EMBEDDING_DIM]), view,
                       "float16" if trunk else "float32", graph_sha256)  # activation maps are large: half precision
    except (KeyError, ValueError) as e:
        raise CacheError(f"the backbone file lacks usable edgetl metadata ({e})") from None
    own = Path(root) / "namespace.json"
    if own.exists():  # `root` is itself one namespace folder: use it only if it is this backbone's
        try:
            found = json.loads(own.read_text())
        except (OSError, ValueError):
            found = {}
        found = found if isinstance(found, dict) else {}
        if (found.get("fingerprint"), found.get("graph_sha256"), found.get("view")) != \
                (ns.meta["fingerprint"], ns.meta["graph_sha256"], view):
            raise CacheError(f"cache {root} holds embeddings of backbone {found.get('backbone', '?')} "
                             f"({str(found.get('fingerprint', '?'))[:12]}), not of {ns.meta['backbone']} "
                             f"({ns.meta['fingerprint'][:12]}); point --cache at the cache root instead")
        ns.dir = Path(root)
    else:
        writable_dir(root)
        mark_output(root, "cache")
    return ns.open(create)
