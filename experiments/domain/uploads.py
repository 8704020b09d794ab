"""Dataset uploads: the accepted suffixes, the team's upload folder, refusing paths sent with an upload, and
the size limit as a person reads it (the cap applied while a request is read is in
``experiments.views.uploads``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError


def size_text(num_bytes: int) -> str:
    """``50 MiB``, ``512 KiB`` or ``100 bytes``: the limit as a person reads it."""
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if num_bytes >= size:
            value = num_bytes / size
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{num_bytes} bytes"


def too_large_message(cap: int) -> str:
    return f"The file is larger than the {size_text(cap)} limit."


UPLOAD_SUFFIXES = (".csv", ".jsonl", ".json", ".parquet", ".txt")


def upload_suffix(filename: str) -> str | None:
    """The whitelisted suffix of an uploaded file's name (lower-cased), or None. Only the suffix is ever
    used."""
    suffix = Path(str(filename).replace("\\", "/")).suffix.lower()
    return suffix if suffix in UPLOAD_SUFFIXES else None


def upload_dir() -> Path:
    """Where uploaded dataset files are stored: ``ARTIFACT_ROOT/datasets`` (one sub-folder per team)."""
    return Path(settings.ARTIFACT_ROOT) / "datasets"


def refuse_upload_paths(fields: dict[str, Any]) -> None:
    """An uploaded dataset's file is stored by the server: no path or other source may come with it."""
    given = [key for key in ("local_path", "eval_local_path", "hub_name", "builtin_name") if fields.get(key)]
    if given:
        raise ValidationError({key: "An uploaded dataset's file is stored by the server; leave this empty."
                               for key in given})
