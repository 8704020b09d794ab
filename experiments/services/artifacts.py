"""Facts about files a run wrote: their path under ARTIFACT_ROOT, their size and their digest."""

from __future__ import annotations

import hashlib
from pathlib import Path

from django.conf import settings


def relative_artifact_path(path: Path) -> str:
    """Paths are stored relative to ARTIFACT_ROOT; anything outside it is refused."""
    return str(Path(path).resolve().relative_to(Path(settings.ARTIFACT_ROOT).resolve()))


def du(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def sha256_tree(path: Path) -> str:
    """sha256 over the files of a folder (names and contents, sorted), or of one file."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with file.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
