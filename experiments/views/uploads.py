"""The upload cap applied while a request's body is read: a body announced too large is not read at all, and a
file that grows past the cap is cut off (the view then shows the field error)."""

from __future__ import annotations

from django.core.files.uploadhandler import FileUploadHandler, StopUpload
from django.http import HttpRequest

# What the other fields of a multipart form (and the part headers) may add to the body besides the file
# itself.
FORM_OVERHEAD_BYTES = 64 * 1024



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
    """Passes file data on to the next handlers until more than ``cap`` file bytes arrived, then stops the
    upload.

    ``exceeded`` tells the view afterwards that a file was cut off (it is then missing from
    ``request.FILES``); the rest of the body is read and thrown away, so the response reaches the client
    normally.
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


# File types an uploaded dataset may have (the engine reads them by suffix); the stored file gets the same
# suffix.
