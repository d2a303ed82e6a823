"""The sources of a multi-stream run: `NAME=URI` options, cameras and a streams file (TOML), checked and
named before anything opens (a password in a URL is never shown)."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from edgetl.deploy.live import SourceError, resolve_source

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None


NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


STREAM_KEYS = {"name", "source", "camera", "retries", "realtime"}


@dataclasses.dataclass
class Source:
    """One stream: `kind` camera | stream | file | files (a folder or glob of images)."""

    name: str
    uri: str  # as the user gave it (shown with its password redacted)
    kind: str
    target: object  # camera index, URL, Path, or a list of Paths
    retries: int | None = None  # failed reopenings in a row before giving up; None: forever
    realtime: bool = True  # a video file played at its frame rate (False: every frame, in order)
    named: bool = False  # the name was given (not made from the source)

    @property
    def live(self) -> bool:
        """Newest frame only (drops counted); False: every frame in order, never dropped."""
        return self.kind in ("camera", "stream") or (self.kind == "file" and self.realtime)


def default_name(uri: str, camera: int | None) -> str:
    if camera is not None:
        return f"camera{camera}"
    tail = uri.split("?")[0].rstrip("/").rsplit("/", 1)[-1]
    stem = Path(tail).stem if "://" not in uri or "/" in uri.split("://", 1)[1] else ""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", stem or uri.split("://", 1)[-1].split("/")[0]).strip("-")
    return (stem or "stream")[:64]


def split_name(text: str) -> tuple[str | None, str]:
    """'door=rtsp://…' → ('door', 'rtsp://…'); a plain source (or a path that exists) → (None, text)."""
    if "=" in text and not os.path.exists(text):
        name, rest = text.split("=", 1)
        if rest and NAME.match(name):
            return name, rest
        if rest and ":" not in name and "/" not in name:
            raise SourceError(f"--source {text!r}: a stream name is letters, digits, - and _ (at most 64)")
    return None, text


def make_source(name: str | None, uri: str | None, camera: int | None = None, retries: int | None = None,
                realtime: bool = True) -> Source:
    """A checked Source. A missing file or an empty folder is an error now; a network stream or a camera
    that cannot open is retried when the run starts."""
    if camera is not None:
        kind, target = "camera", camera
    else:
        kind, target, _ = resolve_source(None, uri)
    given = uri if camera is None else f"camera {camera}"
    named = bool(name)
    name = name or default_name(uri or "", camera)
    if not NAME.match(name):
        raise SourceError(f"stream name {name!r}: use letters, digits, - and _ (at most 64)")
    return Source(name, given, kind, target, retries, realtime, named)


def parse_sources(sources=(), cameras=(), streams_file: str | None = None, retries: int | None = None) -> list[Source]:
    """--source (each NAME=URI or URI), --camera and --streams FILE.toml → checked Sources with
    unique names (an unnamed duplicate gets -2, -3…; a repeated given name is an error)."""
    out: list[Source] = []
    for text in sources:
        name, uri = split_name(text)
        out.append(make_source(name, uri, retries=retries))
    for cam in cameras:
        out.append(make_source(None, None, camera=cam, retries=retries))
    if streams_file:
        out += load_streams_file(streams_file, retries)
    if not out:
        raise SourceError("no source: give --source (repeatable, NAME=URI), --camera or --streams FILE.toml")
    named = [s.name for s in out if s.named]
    twice = sorted({n for n in named if named.count(n) > 1})
    if twice:
        raise SourceError(f"two streams are named {twice[0]!r}; give each its own name")
    seen: dict[str, int] = {n: 1 for n in named}
    for s in (s for s in out if not s.named):
        if s.name in seen:
            seen[s.name] += 1
            s.name = f"{s.name}-{seen[s.name]}"
            if s.name in seen:
                raise SourceError(f"two streams are named {s.name!r}; name them (NAME=URI)")
        seen.setdefault(s.name, 1)
    return out


def load_streams_file(path: str, retries: int | None = None) -> list[Source]:
    """A TOML file of [[stream]] tables: name, source (file, folder or URL) or camera (index), and
    optionally retries and realtime. SourceError (one line) for anything else."""
    if tomllib is None:
        raise SourceError("--streams needs Python 3.11 or later (tomllib)")
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as e:
        raise SourceError(f"--streams {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise SourceError(f"--streams {path}: not valid TOML ({e})") from None
    extra = sorted(set(doc) - {"stream"})
    tables = doc.get("stream")
    if extra or not isinstance(tables, list) or not tables:
        what = f"unknown table {extra[0]!r}" if extra else "no [[stream]] tables"
        raise SourceError(f"--streams {path}: {what}; each stream is a [[stream]] table with name and source or camera")
    out = []
    for i, t in enumerate(tables, 1):
        where = f"--streams {path}: stream {i}"
        if not isinstance(t, dict):
            raise SourceError(f"{where}: not a table")
        unknown = sorted(set(t) - STREAM_KEYS)
        if unknown:
            raise SourceError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(STREAM_KEYS))})")
        if ("source" in t) == ("camera" in t):
            raise SourceError(f"{where}: give exactly one of source = \"FILE|URL|FOLDER\" or camera = INDEX")
        cam = t.get("camera")
        if cam is not None and (not isinstance(cam, int) or isinstance(cam, bool) or cam < 0):
            raise SourceError(f"{where}: camera is a camera index (0, 1, …)")
        src = t.get("source")
        if src is not None and not (isinstance(src, str) and src):
            raise SourceError(f"{where}: source is a file, folder or URL (a string)")
        r = t.get("retries", retries)
        if r is not None and (not isinstance(r, int) or isinstance(r, bool) or r < 0):
            raise SourceError(f"{where}: retries is a whole number (0: never reconnect)")
        rt = t.get("realtime", True)
        if not isinstance(rt, bool):
            raise SourceError(f"{where}: realtime is true or false")
        name = t.get("name")
        if name is not None and not isinstance(name, str):
            raise SourceError(f"{where}: name is a string")
        out.append(make_source(name, src, cam, r, rt))
    return out
