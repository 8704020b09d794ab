"""Size limits for uploaded dataset files, enforced while the request body is read.

A request that announces a body over the limit (``CONTENT_LENGTH``) is refused before it is read at all; for a
client that sends no length, or a wrong one, :class:`CappedUploadHandler` stops the upload as soon as more bytes
have arrived than the limit allows, so an oversized file is never kept in memory or in a temporary file.
"""

from __future__ import annotations

from django.core.files.uploadhandler import FileUploadHandler, StopUpload
from django.http import HttpRequest

# What the other fields of a multipart form (and the part headers) may add to the body besides the file itself.
FORM_OVERHEAD_BYTES = 64 * 1024


def size_text(num_bytes: int) -> str:
    """``50 MiB``, ``512 KiB`` or ``100 bytes``: the limit as a person reads it."""
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if num_bytes >= size:
            value = num_bytes / size
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{num_bytes} bytes"


def too_large_message(cap: int) -> str:
    return f"The file is larger than the {size_text(cap)} limit."


def content_length(request: HttpRequest) -> int | None:
    """The body length the client announced, or None when it gave none (or nonsense)."""
    try:
        length = int(request.META.get("CONTENT_LENGTH") or "")
    except ValueError:
        return None
    return length if length >= 0 else None


def announced_too_large(request: HttpRequest, cap: int) -> bool:
    """Whether the announced body cannot hold a file within ``cap`` (read from the headers only)."""
    length = content_length(request)
    return length is not None and length > cap + FORM_OVERHEAD_BYTES


class CappedUploadHandler(FileUploadHandler):
    """Passes file data on to the next handlers until more than ``cap`` file bytes arrived, then stops the upload.

    ``exceeded`` tells the view afterwards that a file was cut off (it is then missing from ``request.FILES``);
    the rest of the body is read and thrown away, so the response reaches the client normally.
    """

    def __init__(self, cap: int, request: HttpRequest | None = None) -> None:
        super().__init__(request)
        self.cap = cap
        self.received = 0
        self.exceeded = False

    def receive_data_chunk(self, raw_data: bytes, start: int) -> bytes:
        self.received += len(raw_data)
        if self.received > self.cap:
            self.exceeded = True
            raise StopUpload(connection_reset=False)
        return raw_data

    def file_complete(self, file_size: int) -> None:
        return None  # the next handler (memory or temporary file) builds the uploaded file
