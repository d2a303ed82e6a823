"""Where photos come from: a local folder, or an S3-compatible bucket (s3://bucket/prefix).

`scan(data)` lists either as the same `Dataset` of `Item`s, by the same layout rules and with the
same errors as `scan.scan` (which stays the truth for local folders): class folders, train|val|test
splits or a flat folder; hidden entries and edgetl's own output folders skipped; an object is an
image by its name's extension, else by its first bytes. For s3:// data, `Dataset.root` and each
`Item.path` are "s3://bucket/key" strings and `Dataset.source` is the `S3Source` that listed them;
`read_regular` reads such a string through it, so everything that reads items (embed,
train-head's checks) works unchanged. Content keys are SHA-256 of the bytes, as everywhere.

S3 needs the ray extra (s3fs). Credentials come from the usual variables (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE, instance roles…); the endpoint of an
S3-compatible store (MinIO, Ceph, …) from --endpoint-url or AWS_ENDPOINT_URL.

Unchanged objects are not read again: for the cache's file index (`data.index`), an object's "stat"
is its ETag (in place of the inode), size and last-modified time, all from the one listing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import PurePosixPath

from edgetl.data.reading import IMAGE_SUFFIXES, MAX_FILE_BYTES, read_local, too_large
from edgetl.data.scan import IGNORED, Dataset, Item, image_signature, split_folders
from edgetl.data.scan import scan as scan_local
from edgetl.errors import DataError, EdgetlError, ImageError
from edgetl.files import MARKER

EXTRA = "needs the ray extra: pip install 'edgetl[ray]'"
# Passed on to Ray workers (which may run elsewhere) when set where edgetl runs.
CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION")


def is_remote(data) -> bool:
    """Is `data` an object-storage URI (s3://…) rather than a local path?"""
    return isinstance(data, str) and data.startswith("s3://")


def read_regular(path, name: str | None = None) -> bytes:
    """The bytes of a photo: a regular local file, or an "s3://bucket/key" string (an item of s3:// data)
    read from its bucket. ImageError (one line, naming it) when it cannot be read."""
    if is_remote(path):
        return read_uri(path, name)
    return read_local(path, name)


def scan(data, exclude=(), endpoint_url: str | None = None) -> Dataset:
    """The Dataset under a local folder (`scan.scan`) or an s3://bucket/prefix; DataError when unusable."""
    if is_remote(data):
        return S3Source(endpoint_url).scan(data)
    return scan_local(data, exclude)


class LocalSource:
    """Local files, as `embed` always read them."""

    remote = False

    @staticmethod
    def stat(path):
        try:
            return os.stat(path)
        except OSError:
            return None

    @staticmethod
    def index_name(path) -> bytes:
        return os.fsencode(os.path.abspath(path))

    @staticmethod
    def read(path) -> bytes:
        return read_regular(path)

    def read_many(self, paths) -> list[bytes | ImageError]:
        out: list[bytes | ImageError] = []
        for p in paths:
            try:
                out.append(read_regular(p))
            except ImageError as e:
                out.append(e)
        return out

    @staticmethod
    def config() -> dict:
        return {"kind": "local"}


LOCAL = LocalSource()


@dataclasses.dataclass(frozen=True)
class ObjectStat:
    """What the file index compares for an object: its ETag stands in for device and inode."""

    st_dev: int
    st_ino: int
    st_size: int
    st_mtime_ns: int


def s3fs_module():
    try:
        import s3fs
    except ImportError:
        raise EdgetlError(f"s3:// data {EXTRA}") from None
    return s3fs


def split_uri(uri: str) -> tuple[str, str]:
    """("bucket", "prefix/without/slashes") of an s3:// URI; DataError without a bucket."""
    rest = uri[len("s3://"):].strip("/")
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise DataError(f"{uri}: no bucket (s3://BUCKET/PREFIX)")
    return bucket, prefix.strip("/")


class S3Source:
    """Objects in an S3-compatible bucket, listed once and read by key."""

    remote = True

    def __init__(self, endpoint_url: str | None = None, credentials: dict | None = None):
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
        self.credentials = credentials  # None: from this process's environment
        self._fs = None
        self._stats: dict[str, ObjectStat] = {}

    @property
    def fs(self):
        if self._fs is None:
            s3fs = s3fs_module()
            kw: dict = {"endpoint_url": self.endpoint_url} if self.endpoint_url else {}
            c = self.credentials or {}
            if c.get("AWS_ACCESS_KEY_ID"):
                kw.update(key=c["AWS_ACCESS_KEY_ID"], secret=c.get("AWS_SECRET_ACCESS_KEY"),
                          token=c.get("AWS_SESSION_TOKEN"))
            region = c.get("AWS_REGION") or c.get("AWS_DEFAULT_REGION")
            if region:
                kw["client_kwargs"] = {"region_name": region}
            # A store that stops answering costs a bounded wait (three tries of each request, each one
            # timed out), never a hang: EDGETL_S3_TIMEOUT seconds per connection and per read.
            t = s3_timeout()
            kw["config_kwargs"] = {"connect_timeout": t, "read_timeout": t,
                                   "retries": {"max_attempts": 3, "mode": "standard"}}
            self._fs = s3fs.S3FileSystem(**kw)
            self._fs.retries = 1  # s3fs's own retries (nested twice around botocore's): none
        return self._fs

    def config(self) -> dict:
        """What a worker elsewhere needs to read the same objects: the endpoint, and the credentials
        set in this environment (a worker without them uses its own environment or role)."""
        creds = self.credentials or {k: os.environ[k] for k in CREDENTIAL_VARS if os.environ.get(k)}
        return {"kind": "s3", "endpoint_url": self.endpoint_url, "credentials": creds or None}

    def _where(self, uri: str) -> str:
        return f"{uri}" + (f" at {self.endpoint_url}" if self.endpoint_url else "")

    def scan(self, uri: str) -> Dataset:
        """The Dataset under s3://bucket/prefix, by `scan.scan`'s rules. DataError when unusable."""
        bucket, prefix = split_uri(uri)
        base = f"{bucket}/{prefix}" if prefix else bucket
        root = f"s3://{base}"
        fs = self.fs
        try:
            fs.invalidate_cache(base)
            found = fs.find(base, detail=True)
        except FileNotFoundError as e:
            raise DataError(f"not a folder: {self._where(root)} ({_reason(e)})") from None
        except Exception as e:  # noqa: BLE001 - botocore, aiohttp, credentials: one line each
            raise DataError(f"cannot list {self._where(root)}: {_reason(e)}") from None
        tree = _Node()
        for name, info in found.items():
            if not name.startswith(base + "/"):
                continue
            rel = name[len(base) + 1:]
            parts = rel.rstrip("/").split("/")
            if not rel or any(p in ("", ".", "..") for p in parts):
                continue  # keys no folder could hold
            if rel.endswith("/") or info.get("type") == "directory":
                tree.folder(parts)
                continue
            tree.add(parts, info)
            self._stats[f"s3://{name}"] = _object_stat(info)
        if tree.empty():
            raise DataError(f"not a folder: {self._where(root)} (nothing under it)")
        _REGISTERED[bucket] = self
        return _Lister(self, root, self._sniff(root, tree)).dataset(tree)

    def _sniff(self, root: str, tree: "_Node") -> set[str]:
        """The objects named unlike an image whose first bytes are an image's (one concurrent request
        each, all at once), as `scan` looks inside every file."""
        uris = [uri for uri, info in tree.walk(root) if PurePosixPath(uri).suffix.lower() not in IMAGE_SUFFIXES
                and int(info.get("size") or 0) > 0]
        if not uris:
            return set()
        keys = [u[len("s3://"):] for u in uris]
        try:
            heads = self.fs.cat_ranges(keys, [0] * len(keys), [16] * len(keys), on_error="return")
        except Exception:  # noqa: BLE001 - unreadable: not images as far as listing goes
            return set()
        return {u for u, h in zip(uris, heads) if isinstance(h, (bytes, bytearray)) and image_signature(bytes(h))}

    def stat(self, uri: str) -> ObjectStat | None:
        return self._stats.get(uri)

    @staticmethod
    def index_name(uri: str) -> bytes:
        return uri.encode()

    def read(self, uri: str, name: str | None = None) -> bytes:
        """The object's bytes; ImageError (one line, naming it) when it cannot be read or is larger than
        any photo (from its listed size, else from the bytes received: never more are fetched)."""
        listed = self._stats.get(uri)
        if listed is not None and listed.st_size > MAX_FILE_BYTES:
            raise too_large(name or uri, listed.st_size)
        if getattr(self, "_down", None):
            raise ImageError(f"{name or uri}: not read: {self._down}")
        if listed is not None and listed.st_size == 0:
            return b""
        try:
            data = self.fs.cat_file(uri[len("s3://"):], start=0, end=MAX_FILE_BYTES + 1, timeout=_deadline())
        except Exception as e:  # noqa: BLE001 - any way a read can fail is one image skipped
            if _empty_range(e):
                return b""
            self._note_down([e])
            raise ImageError(f"{name or uri}: {_reason(e)}") from None
        if len(data) > MAX_FILE_BYTES:
            raise too_large(name or uri, len(data))
        return data

    def _note_down(self, results) -> None:
        """When every read of a call failed on a timeout or a refused connection, the store is taken as
        gone for the rest of the run: later reads fail at once (a re-run reads what is missing)."""
        if results and all(isinstance(e, BaseException) and _unreachable(e) for e in results):
            self._down = f"{self._where('the store')} stopped answering ({_reason(results[0])})"

    def read_many(self, uris) -> list[bytes | ImageError]:
        """Many objects at once (concurrent requests): bytes, or the ImageError of each."""
        uris = list(uris)
        big = {u: self._stats[u].st_size for u in uris if u in self._stats and self._stats[u].st_size > MAX_FILE_BYTES}
        fetch = [u for u in uris if u not in big]
        if getattr(self, "_down", None):  # the store stopped answering: no more waits, one line each
            return [too_large(u, big[u]) if u in big else ImageError(f"{u}: not read: {self._down}") for u in uris]
        keys = [u[len("s3://"):] for u in fetch]
        try:  # at most one byte more than any photo of each (a larger one is refused below)
            got = dict(zip(fetch, self.fs.cat_ranges(keys, [0] * len(keys), [MAX_FILE_BYTES + 1] * len(keys),
                                                     on_error="return", timeout=_deadline()))) if keys else {}
        except Exception as e:  # noqa: BLE001 - the whole call failed: each one says why
            got = {u: e for u in fetch}
        self._note_down([got.get(u) for u in fetch])
        out: list[bytes | ImageError] = []
        for u in uris:
            v = got.get(u)
            if isinstance(v, BaseException) and _empty_range(v):
                v = b""
            if u in big:
                out.append(too_large(u, big[u]))
            elif isinstance(v, (bytes, bytearray)):
                out.append(bytes(v) if len(v) <= MAX_FILE_BYTES else too_large(u, len(v)))
            else:
                out.append(ImageError(f"{u}: {_reason(v) if isinstance(v, BaseException) else 'not read'}"))
        return out



def s3_timeout() -> float:
    """Seconds to wait for an S3 connection or read: EDGETL_S3_TIMEOUT, default 30."""
    try:
        t = float(os.environ.get("EDGETL_S3_TIMEOUT", "30"))
    except ValueError:
        t = 30.0
    return t if 0 < t < 3600 else 30.0


def _deadline() -> float:
    """The longest a call may wait in all (3 tries, each one connecting and reading, and the back-offs)."""
    return 3 * (2 * s3_timeout() + 1) + 10


def from_config(cfg: dict):
    """The source a worker reads with, from `source.config()`."""
    if cfg.get("kind") == "s3":
        return S3Source(cfg.get("endpoint_url"), cfg.get("credentials"))
    return LOCAL


_REGISTERED: dict[str, S3Source] = {}  # bucket → the source that listed it (its endpoint and credentials)


def read_uri(uri: str, name: str | None = None) -> bytes:
    """The bytes of an s3:// object (through the source that listed its bucket, else one from the
    environment); ImageError when it cannot be read."""
    bucket, _ = split_uri(uri)
    src = _REGISTERED.get(bucket)
    if src is None:
        src = _REGISTERED[bucket] = S3Source()
    return src.read(uri, name)


def _reason(e) -> str:
    if isinstance(e, FileNotFoundError):  # s3fs says why for a bucket, and only the key for an object
        text = " ".join(str(e).split())
        return text if text and "/" not in text else "no such object"
    if isinstance(e, PermissionError):
        return "access denied"
    text = " ".join(str(e).split())[:200]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _empty_range(e: BaseException) -> bool:
    """The error of a ranged read of an empty object (its bytes are b"")."""
    return "range is not satisfiable" in str(e).lower() or "InvalidRange" in str(e)


def _unreachable(e: BaseException) -> bool:
    """A timeout or a connection that failed (botocore, aiohttp and fsspec name theirs so), not a refusal."""
    return isinstance(e, (TimeoutError, ConnectionError)) or any(w in type(e).__name__ for w in ("Timeout", "Connect"))


def _object_stat(info: dict) -> ObjectStat:
    etag = str(info.get("ETag") or info.get("etag") or "")
    mtime = info.get("LastModified")
    mtime_ns = int(mtime.timestamp() * 1e9) if hasattr(mtime, "timestamp") else 0
    ino = int.from_bytes(hashlib.sha256(etag.encode()).digest()[:7], "big")  # fits SQLite's INTEGER
    return ObjectStat(0, ino, int(info.get("size") or info.get("Size") or 0), mtime_ns)


class _Node:
    """A folder of the listing: sub-folders, objects, and whether edgetl's marker is in it."""

    def __init__(self):
        self.dirs: dict[str, _Node] = {}
        self.files: dict[str, dict] = {}
        self.marker = False

    def folder(self, parts) -> "_Node":
        node = self
        for p in parts:
            node = node.dirs.setdefault(p, _Node())
        return node

    def add(self, parts, info) -> None:
        node = self.folder(parts[:-1])
        node.files[parts[-1]] = info
        node.marker |= parts[-1] == MARKER

    def empty(self) -> bool:
        return not self.dirs and not self.files

    def walk(self, at: str):
        """(uri, info) of every object below, hidden and ignored names left out."""
        for name, is_dir in self.entries():
            if is_dir:
                yield from self.dirs[name].walk(f"{at}/{name}")
            else:
                yield f"{at}/{name}", self.files[name]

    def entries(self) -> list[tuple[str, bool]]:
        """(name, is a folder), by name, hidden and ignored names left out, as `scan` lists a folder."""
        names = [(n, True) for n in self.dirs] + [(n, False) for n in self.files]
        return sorted((e for e in names if not e[0].startswith(".") and e[0] not in IGNORED),
                      key=lambda e: (e[0], e[1]))


class _Lister:
    """`scan.scan`'s layout rules over a listing (no links, special files or hard links in a bucket)."""

    def __init__(self, src: S3Source, root: str, sniffed: set[str]):
        self.src, self.root, self.sniffed, self.notes = src, root, sniffed, []

    def looks_like_image(self, uri: str) -> bool:
        """By name's extension (any case), else by content (`scan.looks_like_image`'s rule)."""
        return PurePosixPath(uri).suffix.lower() in IMAGE_SUFFIXES or uri in self.sniffed

    def images(self, node: _Node, at: str, recursive: bool) -> tuple[list[str], bool]:
        out, passed = [], False
        for name, is_dir in node.entries():
            uri = f"{at}/{name}"
            if is_dir:
                if not recursive:
                    continue
                sub = node.dirs[name]
                if sub.marker:
                    passed = True
                else:
                    found, p = self.images(sub, uri, True)
                    out += found
                    passed |= p
            elif self.looks_like_image(uri):
                out.append(uri)
        return out, passed

    def classes(self, class_dirs: list[tuple[str, _Node, str]]) -> list[tuple[str, list[str]]]:
        out = []
        for name, node, uri in class_dirs:
            found, passed = self.images(node, uri, True)
            if not found and passed:
                self.notes.append(f"{uri} holds only edgetl output; not a class")
                continue
            out.append((name, found))
        return out

    def dataset(self, tree: _Node) -> Dataset:
        root = self.root
        subdirs = [(n, tree.dirs[n], f"{root}/{n}") for n, is_dir in tree.entries() if is_dir and not tree.dirs[n].marker]
        splits = split_folders(root, subdirs, lambda d: d[0])
        items: list[Item] = []
        if splits:
            layout, classes = "split", set()
            for sname, snode, suri in splits:
                class_dirs = [(n, snode.dirs[n], f"{suri}/{n}") for n, is_dir in snode.entries() if is_dir]
                loose = [n for n, is_dir in snode.entries() if not is_dir and self.looks_like_image(f"{suri}/{n}")]
                if loose and not class_dirs:
                    raise DataError(f"{suri} holds images directly: put them in {suri}/<class>/ (or, if "
                                    f"{sname!r} is a class, rename it)")
                for label, found in self.classes(class_dirs):
                    classes.add(label)
                    items += [Item(p, label, sname.lower()) for p in found]
            classes = sorted(classes)
        elif subdirs:
            layout = "classes"
            by_class = self.classes(subdirs)
            classes = [label for label, _ in by_class]
            for label, found in by_class:
                items += [Item(p, label, None) for p in found]
            loose = [n for n, is_dir in tree.entries() if not is_dir and self.looks_like_image(f"{root}/{n}")]
            if loose:
                self.notes.append(f"{len(loose)} images directly in {root} (not in a class folder) were ignored")
        else:
            layout, classes = "flat", []
            found, _ = self.images(tree, root, False)
            items = [Item(p, None, None) for p in found]
        if not items:
            raise DataError(f"no images found in {root}")
        return Dataset(root, items, classes, layout, self.notes, source=self.src)
