"""What a cache already knows about files, so that an unchanged re-run reads none of them.

CACHE/files.sqlite holds two tables:

    photos(path, dev, ino, size, mtime_ns, key)   the content key (SHA-256) of a photo file as it was
    shards(path, size, mtime_ns)                  cache shards whose checksum was verified

A photo whose path, device, inode, size and modification time are unchanged is taken to have the
key recorded for it (as rsync and git do); any change and it is read and hashed again. A shard is
immutable once written (its name is its checksum), so a verified one whose size and time are
unchanged is not hashed again. The index is only a shortcut: deleting it costs one full re-read,
and a write lost to a crash costs the same for the photos concerned. Several processes may share
it (SQLite locking); a database that cannot be opened or read is ignored, and rebuilt.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from pathlib import Path

NAME = "files.sqlite"


def _ident(st) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class FileIndex:
    def __init__(self, cache_root: str | os.PathLike):
        self.path = Path(cache_root) / NAME
        self._lock = threading.Lock()
        self._photos: dict[str, tuple] = {}
        self._shards: dict[str, tuple] = {}
        self._new_photos: list[tuple] = []
        self._new_shards: list[tuple] = []
        self._db = None
        with contextlib.suppress(sqlite3.Error, OSError):
            self._db = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS photos (path BLOB PRIMARY KEY, dev INT, ino INT, size INT, "
                             "mtime_ns INT, key BLOB)")
            self._db.execute("CREATE TABLE IF NOT EXISTS shards (path BLOB PRIMARY KEY, size INT, mtime_ns INT)")
            self._db.commit()
            for path, dev, ino, size, mtime, key in self._db.execute("SELECT * FROM photos"):
                if isinstance(key, bytes) and len(key) == 32:
                    self._photos[path] = ((dev, ino, size, mtime), key)
            for path, size, mtime in self._db.execute("SELECT * FROM shards"):
                self._shards[path] = (size, mtime)
        if self._db is not None and not self._readable():
            self._db = None  # a damaged database: work without it

    def _readable(self) -> bool:
        try:
            self._db.execute("SELECT count(*) FROM photos").fetchone()
            return True
        except sqlite3.Error:
            return False

    def key_of(self, path: bytes, st) -> bytes | None:
        """The recorded key of `path` (absolute, os.fsencode'd) if the file is unchanged since it was recorded."""
        hit = self._photos.get(path)
        return hit[1] if hit is not None and hit[0] == _ident(st) else None

    def remember(self, path: bytes, st, key: bytes) -> None:
        with self._lock:
            if self._photos.get(path) != (_ident(st), key):
                self._photos[path] = (_ident(st), key)
                self._new_photos.append((path, *_ident(st), key))

    def shard_verified(self, path: Path, st) -> bool:
        return self._shards.get(os.fsencode(path)) == (st.st_size, st.st_mtime_ns)

    def verified(self, path: Path, st) -> None:
        with self._lock:
            self._shards[os.fsencode(path)] = (st.st_size, st.st_mtime_ns)
            self._new_shards.append((os.fsencode(path), st.st_size, st.st_mtime_ns))

    def save(self) -> None:
        """Write what was learnt (one transaction); failures only cost speed next time."""
        with self._lock:
            photos, shards = self._new_photos, self._new_shards
            self._new_photos, self._new_shards = [], []
        if self._db is None or not (photos or shards):
            return
        with contextlib.suppress(sqlite3.Error):
            with self._db:
                self._db.executemany("INSERT OR REPLACE INTO photos VALUES (?, ?, ?, ?, ?, ?)", photos)
                self._db.executemany("INSERT OR REPLACE INTO shards VALUES (?, ?, ?)", shards)

    def close(self) -> None:
        self.save()
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None
