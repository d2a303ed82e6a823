"""Render an HTML page in headless Chromium and check the screenshot is not blank.

    python scripts/screenshot.py report.html [-o report.png] [--size 1200,900]

Needs Debian's `chromium` (apt-get install chromium) or Chrome on PATH. Exits 1 (one line) when the
browser is missing, fails, or draws a blank page. The tests use `screenshot` and `blank` from here.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> str | None:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def screenshot(page: str | os.PathLike, png: str | os.PathLike, size=(1200, 900), browser: str | None = None,
               timeout: float = 90) -> Path:
    """Open `page` (a local HTML file) in headless Chromium with a fresh profile, nothing fetched from
    the network, and write a screenshot of `size` to `png`. RuntimeError when it fails."""
    browser = browser or find_browser()
    if browser is None:
        raise RuntimeError("no chromium on PATH (apt-get install chromium)")
    png = Path(png).absolute()
    png.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgetl-chromium-") as profile:
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={profile}", f"--screenshot={png}",
               f"--window-size={size[0]},{size[1]}", Path(page).absolute().as_uri()]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                               env={**os.environ, "HOME": profile})
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"chromium did not finish within {timeout:.0f} s") from None
    if r.returncode != 0 or not png.is_file():
        tail = " ".join((r.stderr or r.stdout).split())[-300:]
        raise RuntimeError(f"chromium failed (exit {r.returncode}): {tail}")
    return png


def blank(png: str | os.PathLike) -> str | None:
    """Why the screenshot looks blank (unreadable, one colour, nearly all white), or None when it shows something."""
    import cv2

    img = cv2.imread(str(png), cv2.IMREAD_COLOR)
    if img is None:
        return "not a readable PNG"
    if float(img.std()) == 0:
        return f"one colour only ({img[0, 0].tolist()})"
    ink = float((img.min(axis=2) < 235).mean())
    if ink < 0.01:
        return f"almost all white ({ink:.2%} of the pixels drawn)"
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("page", type=Path)
    ap.add_argument("-o", "--output", type=Path)
    ap.add_argument("--size", default="1200,900")
    a = ap.parse_args()
    out = a.output or a.page.with_suffix(".png")
    try:
        w, h = (int(v) for v in a.size.split(","))
        screenshot(a.page, out, (w, h))
    except (RuntimeError, ValueError) as e:
        sys.exit(f"screenshot: {e}")
    why = blank(out)
    if why:
        sys.exit(f"screenshot: {out} is blank: {why}")
    print(f"wrote {out}: the page rendered (not blank)")


if __name__ == "__main__":
    main()
