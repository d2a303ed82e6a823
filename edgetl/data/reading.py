"""Reading a photo's bytes from the local disk: only regular files (a FIFO would block, a device never
end), and the file names that count as images."""

from __future__ import annotations

import os
import stat

from edgetl.errors import ImageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".dib", ".webp", ".tif", ".tiff",
                  ".ppm", ".pgm", ".pbm", ".pnm", ".gif", ".jp2"}
# No photo edgetl reads is larger (a 200-megapixel JPEG is well under it, 100 MP of uncompressed TIFF is
# 300 MB); a larger file is refused from its size, before a byte of it is read.
MAX_FILE_BYTES = 320_000_000


def too_large(name: str, size: int) -> ImageError:
    return ImageError(f"{name}: {size / 1e6:,.0f} MB, larger than any photo edgetl reads "
                      f"(limit {MAX_FILE_BYTES / 1e6:.0f} MB); not read")


def read_local(path: str | os.PathLike, name: str | None = None) -> bytes:
    """The bytes of a regular local file; ImageError (one line, naming it) for anything else."""
    name = name or str(path)
    try:
        with open(path, "rb", opener=lambda p, flags: os.open(p, flags | getattr(os, "O_NONBLOCK", 0))) as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ImageError(f"{name}: not a regular file")
            if st.st_size > MAX_FILE_BYTES:
                raise too_large(name, st.st_size)
            data = f.read(MAX_FILE_BYTES + 1)  # a file that grew meanwhile is still read only so far
            if len(data) > MAX_FILE_BYTES:
                raise too_large(name, len(data))
            return data
    except OSError as e:
        raise ImageError(f"{name}: {e.strerror}") from None
