"""Writes that never leave anything half-written, with the user's umask.

* `atomic_path` / `write_bytes`: a temporary file in the target folder, then os.replace.
* `output_set`: a whole output folder built beside the target and swapped in at the end, so a
  failure leaves the previous set intact and an interrupt leaves nothing.
* Every folder edgetl writes holds a marker file (`MARKER`), so that scanning a photo folder never
  reads edgetl's own output as photos.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

from edgetl.errors import OutputError

MARKER = ".edgetl"  # in every output and cache folder: "edgetl wrote this; not photos"
_UMASK = os.umask(0)
os.umask(_UMASK)


def file_mode() -> int:
    return 0o666 & ~_UMASK


def dir_mode() -> int:
    return 0o777 & ~_UMASK


def writable_dir(path: str | os.PathLike) -> Path:
    """Create `path` (and parents) if missing and check it can be written; OutputError otherwise."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create output folder {p}: {e.strerror}") from None
    if not p.is_dir():
        raise OutputError(f"output folder {p} is not a folder")
    if not os.access(p, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {p} is not writable")
    return p


def mark_output(folder: str | os.PathLike, what: str = "output") -> None:
    """Mark `folder` as edgetl's own (an output or a cache): photo scans skip it."""
    m = Path(folder) / MARKER
    if not m.exists():
        with contextlib.suppress(OSError):
            write_bytes(m, f"edgetl {what}: written by edgetl, not photos\n".encode())


def _disk_error(e: OSError, what: Path) -> OutputError:
    return OutputError(f"cannot write {what}: {e.strerror or e}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; on success it replaces `path`, on any error it is removed."""
    p = Path(path)
    writable_dir(p.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    except OSError as e:
        raise _disk_error(e, p) from None
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
    except OSError as e:
        raise _disk_error(e, Path(path)) from None


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def check_parent_writable(path: str | os.PathLike) -> Path:
    """The nearest existing ancestor of `path` must be a writable folder (nothing is created)."""
    p = Path(path).absolute()
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"cannot create output folder {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {path} cannot be created: {parent} is not writable")
    if p.exists() and not p.is_dir():
        raise OutputError(f"output folder {path} is a file")
    return p


@contextlib.contextmanager
def output_set(target: str | os.PathLike, stale_after_s: float = 3600):
    """Yield a fresh hidden folder beside `target`; on success it becomes `target` (the previous
    `target`, if any, is replaced as a whole); on any error or interrupt it is removed.

    Temporary folders of killed runs (older than `stale_after_s`) are swept.
    """
    target = check_parent_writable(target)
    writable_dir(target.parent)
    _sweep(target, stale_after_s)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(mode=0o700)
    except OSError as e:
        raise _disk_error(e, target) from None
    try:
        yield tmp
        mark_output(tmp)
        os.chmod(tmp, dir_mode())
        if target.exists() and _exchange(tmp, target):
            shutil.rmtree(tmp, ignore_errors=True)  # now the previous set
        else:
            old = None
            if target.exists():
                old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
                os.replace(target, old)
            os.replace(tmp, target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _sweep(target: Path, age_s: float) -> None:
    now = time.time()
    for pattern in (f".{target.name}.tmp-*", f".{target.name}.old-*"):
        for d in target.parent.glob(pattern):
            with contextlib.suppress(OSError):
                if now - d.stat().st_mtime > age_s:
                    shutil.rmtree(d, ignore_errors=True)
