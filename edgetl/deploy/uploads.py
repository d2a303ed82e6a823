"""What `edgetl serve` accepts as an image: the bytes' own signature decides, a declared type that
contradicts it is refused, and decoding is the one `load_image` of every other path. Torch-free.

Every refusal is a `BadInput` with an HTTP status, a kind (the label of the errors metric) and one
line for the client. Nothing here touches the filesystem: a client's file name is only ever echoed.
"""

from __future__ import annotations

import numpy as np
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from edgetl.data.preprocess import load_image
from edgetl.errors import EdgetlError, ImageError
from edgetl.spec import Spec


class BadInput(EdgetlError):
    """A request or an image that cannot be answered: HTTP `status`, metric `kind`, one-line message."""

    def __init__(self, status: int, kind: str, message: str):
        super().__init__(message)
        self.status, self.kind = status, kind


# Formats by their first bytes (what OpenCV decodes), and the media types that name each.
SIGNATURES = [(b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
              (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
              (b"\xff\x4f\xff\x51", "JPEG 2000"), (b"BM", "BMP")]
MEDIA_TYPES = {"image/jpeg": "JPEG", "image/jpg": "JPEG", "image/pjpeg": "JPEG", "image/png": "PNG", "image/gif": "GIF",
               "image/tiff": "TIFF", "image/jp2": "JPEG 2000", "image/jpx": "JPEG 2000", "image/bmp": "BMP",
               "image/x-bmp": "BMP", "image/x-ms-bmp": "BMP", "image/webp": "WebP",
               "image/x-portable-anymap": "PNM", "image/x-portable-bitmap": "PNM", "image/x-portable-graymap": "PNM",
               "image/x-portable-pixmap": "PNM"}


def sniff(data: bytes) -> str | None:
    """The image format of `data` by its signature, or None."""
    for magic, fmt in SIGNATURES:
        if data.startswith(magic):
            return fmt
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    if len(data) > 2 and data[0:1] == b"P" and data[1:2] in b"123456" and data[2:3] in b" \t\r\n#":
        return "PNM"
    return None


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def decode_upload(data: bytes, spec: Spec, name: str, content_type: str | None = None) -> np.ndarray:
    """Bytes of one uploaded image → the model input (uint8 RGB [H,W,3]), exactly as `edgetl predict`
    would make it from a file with these bytes. BadInput: 400 for an empty, truncated, oversized or
    corrupt image; 415 for bytes that are no image format read here, or that are not the image type
    the client declared (a GIF sent as image/jpeg). A declared type that names no image format
    (application/octet-stream, curl's default form type) leaves the decision to the bytes."""
    if not data:
        raise BadInput(400, "empty", f"{name}: empty (0 bytes)")
    fmt = sniff(data)
    declared = media_type(content_type)
    if fmt is None:
        what = f"declared {declared} but " if declared.startswith("image/") else ""
        raise BadInput(415, "unsupported", f"{name}: {what}not an image format edgetl reads "
                                           "(JPEG, PNG, WebP, BMP, GIF, TIFF, PNM, JPEG 2000)")
    if declared in MEDIA_TYPES and MEDIA_TYPES[declared] != fmt:
        raise BadInput(415, "type_mismatch", f"{name}: declared {declared} but the bytes are a {fmt} image; "
                                             "send its true type or application/octet-stream")
    try:
        return load_image(data, spec, name=name)
    except ImageError as e:
        text = str(e)
        kind = ("empty" if "empty" in text else "truncated" if "truncated" in text
                else "too_many_pixels" if "over the limit" in text else "corrupt")
        raise BadInput(400, kind, text) from None


def multipart_files(body: bytes, content_type: str, max_files: int) -> list[tuple[str, str | None, bytes]]:
    """The files of a multipart/form-data body: (name, declared type, bytes) per part that carries a
    file name or an image type; plain form fields are ignored. BadInput 400 for a malformed body,
    413 for more than `max_files` files."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise BadInput(400, "bad_request", "multipart body without a boundary in its Content-Type")
    files: list[tuple[str, str | None, bytes]] = []
    part: dict = {}
    field, value = bytearray(), bytearray()
    ended = []

    def begin():
        part.clear()
        part.update(headers={}, data=[])

    def header_end():
        part["headers"][bytes(field).strip().lower()] = bytes(value).strip()
        field.clear()
        value.clear()

    def end():
        _, disp = parse_options_header(part["headers"].get(b"content-disposition", b""))
        ptype = part["headers"].get(b"content-type", b"").decode("latin-1") or None
        filename = disp.get(b"filename")
        if filename is None and not media_type(ptype).startswith("image/"):
            return  # a plain form field
        if len(files) >= max_files:
            raise BadInput(413, "too_many_files", f"more than {max_files} files in one request")
        label = (filename or disp.get(b"name") or b"").decode("utf-8", "replace")[:200] or f"file {len(files) + 1}"
        files.append((label, ptype, b"".join(part["data"])))

    callbacks = {"on_part_begin": begin, "on_part_end": end, "on_header_end": header_end,
                 "on_header_field": lambda d, s, e: field.extend(d[s:e]),
                 "on_header_value": lambda d, s, e: value.extend(d[s:e]),
                 "on_part_data": lambda d, s, e: part["data"].append(d[s:e]),
                 "on_end": lambda: ended.append(True)}
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except FormParserError as e:
        raise BadInput(400, "bad_request", f"malformed multipart body ({' '.join(str(e).split())[:120]})") from None
    if not ended:
        raise BadInput(400, "bad_request", "malformed multipart body (it ends before its closing boundary)")
    if not files:
        raise BadInput(400, "bad_request", "no files in the multipart body (send images as file fields)")
    return files
