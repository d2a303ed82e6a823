"""What `edgetl run` shows and saves: the overlay drawn on a frame, whether there is a display, the annotated
video (written under a temporary name, renamed when whole), and file names OpenCV can open. Torch-free."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from edgetl.data.preprocess import opencv
from edgetl.errors import EdgetlError
from edgetl.files import check_parent_writable, file_mode, writable_dir

UNKNOWN = "unknown"  # the label below the threshold


def draw(frame: np.ndarray, label: str, prob: float, top, fps: float, stages: dict[str, float]) -> np.ndarray:
    """Overlay: label and confidence, top-k bars, FPS and per-stage latency."""
    cv2 = opencv()
    img = frame.copy()
    h, w = img.shape[:2]
    scale = max(0.5, w / 900)
    colour = (60, 200, 60) if label != UNKNOWN else (0, 165, 255)
    cv2.rectangle(img, (0, 0), (w, int(44 * scale)), (0, 0, 0), -1)
    cv2.putText(img, f"{label} {prob:.2f}", (10, int(32 * scale)), cv2.FONT_HERSHEY_SIMPLEX, 1.0 * scale, colour,
                max(1, int(2 * scale)), cv2.LINE_AA)
    y = int(60 * scale)
    for name, p in top:
        bar = int((w * 0.35) * p)
        cv2.rectangle(img, (10, y), (10 + bar, y + int(16 * scale)), (200, 160, 40), -1)
        cv2.putText(img, f"{name} {p:.2f}", (14, y + int(13 * scale)), cv2.FONT_HERSHEY_SIMPLEX, 0.45 * scale,
                    (255, 255, 255), 1, cv2.LINE_AA)
        y += int(22 * scale)
    info = f"{fps:.1f} FPS  " + "  ".join(f"{k} {v:.1f}ms" for k, v in stages.items())
    cv2.rectangle(img, (0, h - int(26 * scale)), (w, h), (0, 0, 0), -1)
    cv2.putText(img, info, (10, h - 10), cv2.FONT_HERSHEY_SIMPLEX, 0.45 * scale, (255, 255, 255), 1, cv2.LINE_AA)
    return img


def qt_fonts() -> None:
    """opencv-python's Qt looks for fonts in a folder the wheel does not ship (and warns on every
    draw); point it at the system's fonts when there are any."""
    if os.path.isdir(os.environ.get("QT_QPA_FONTDIR", "")):
        return
    for d in ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/truetype", "/usr/share/fonts"):
        if os.path.isdir(d):
            os.environ["QT_QPA_FONTDIR"] = d
            return


def has_display() -> bool:
    return os.name == "nt" or sys.platform == "darwin" or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def utf8_name(name: str) -> bool:
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def opencv_name(path: Path) -> tuple[str, str | None]:
    """A name OpenCV can open for `path`, and the temporary link folder to remove once it is open.

    OpenCV takes names as UTF-8 only: a name with bytes that are not UTF-8 (which Python holds as
    surrogates) crashed it. Such a path is reached through a link with an ASCII name in a fresh
    temporary folder: to the file itself, or, when only its folder's name is the problem (a file to
    be written under an ASCII name), to the folder."""
    name = str(path)
    if utf8_name(name):
        return name, None

    tmp = tempfile.mkdtemp(prefix="edgetl-name-")
    if utf8_name(path.name):
        os.symlink(os.path.abspath(path.parent), os.path.join(tmp, "d"))
        return os.path.join(tmp, "d", path.name), tmp
    suffix = path.suffix if utf8_name(path.suffix) else ""
    os.symlink(os.path.abspath(path), os.path.join(tmp, "source" + suffix))
    return os.path.join(tmp, "source" + suffix), tmp


def unlink_name(tmp: str | None) -> None:
    if tmp is not None:
        for entry in os.listdir(tmp):
            os.unlink(os.path.join(tmp, entry))
        os.rmdir(tmp)


class Video:
    """An annotated video written under a temporary name beside `path` and renamed into place by
    `close()`, so `path` is always either absent, the previous file, or a finished video."""

    def __init__(self, path: str):
        self.final = Path(path)
        check_parent_writable(self.final.parent / "x")
        # A name of its own (two runs may save to the same file at once), ASCII whatever the final name
        suffix = self.final.suffix if self.final.suffix.isascii() else ".avi"
        self.tmp = self.final.parent / f".edgetl-{os.getpid()}-{os.urandom(4).hex()}.partial{suffix}"
        self.video = None
        self.size: tuple[int, int] | None = None
        self.frames = 0

    def write(self, img: np.ndarray, fps: float) -> None:
        cv2 = opencv()
        if self.video is None:
            writable_dir(self.final.parent)
            self.size = (img.shape[1], img.shape[0])
            mp4 = self.final.suffix.lower() in (".mp4", ".m4v", ".mov")
            name, link = opencv_name(self.tmp)
            try:
                self.video = cv2.VideoWriter(name, cv2.VideoWriter_fourcc(*("mp4v" if mp4 else "MJPG")), fps,
                                             self.size)
            finally:
                unlink_name(link)
            if not self.video.isOpened():
                self.video = None
                raise EdgetlError(f"cannot write video {self.final} (try a .mp4 or .avi name)")
        if (img.shape[1], img.shape[0]) != self.size:
            img = cv2.resize(img, self.size)
        self.video.write(img)
        self.frames += 1

    def close(self) -> Path | None:
        """Finish the file and move it into place; None when no frame was written."""
        if self.video is None:
            return None
        self.video.release()
        self.video = None
        if not self.frames:
            self.tmp.unlink(missing_ok=True)
            return None

        os.chmod(self.tmp, file_mode())
        os.replace(self.tmp, self.final)
        return self.final
