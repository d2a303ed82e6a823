"""Typed errors. The library raises these; the CLI turns them into one line and exit code 1."""


class EdgetlError(Exception):
    """Base class of every error edgetl reports to a user."""


class UnknownBackbone(EdgetlError):
    pass


class WeightsUnavailable(EdgetlError):
    pass


class ImageError(EdgetlError):
    """An image that cannot be decoded (corrupt, truncated, not an image, too large)."""


class ParityError(EdgetlError):
    """An exported artifact disagrees with its reference beyond the stated tolerance."""


class ModelError(EdgetlError):
    """A model file that is missing, not ONNX, or not the kind of edgetl artifact expected."""


class DataError(EdgetlError):
    """A dataset that cannot be used (empty, single class, class without images...)."""


class CacheError(EdgetlError):
    """An embedding cache that does not match the backbone or is unreadable."""


class OutputError(EdgetlError):
    """An output path that cannot be written."""


class GateRefused(EdgetlError):
    """An int8/fp16 model that the gate refused (worse, or not faster); `summary` holds the figures."""

    def __init__(self, message: str, summary: dict | None = None):
        super().__init__(message)
        self.summary = summary or {}
