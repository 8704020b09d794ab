"""The content address of a run: what decides its results, hashed canonically.

Two runs with the same address train the same student on the same rows with the same seed and settings, with
the same engine code, so one can take the other's results (``services.baseline_reuse``). The address covers:

- the frozen engine config (canonical JSON: sorted keys, no whitespace, floats as JSON writes them);
- the content of every local file or folder the config reads (datasets, local models): a file's bytes are
  hashed; a model folder by its files' names, sizes and modification times (weights are too large to read
  at launch); a model trained by a run here (``runs/<id>/final``) by the digest its run recorded for it;
- the engine's code: every file under workers/engine, and the torch and transformers versions.

Hub names are part of the config; a hub model without a local folder is addressed by its id and revision.
"""

from __future__ import annotations

import functools
import hashlib
import json
from importlib import metadata
from pathlib import Path
from typing import Any

from django.conf import settings

_ENGINE_DIR = Path(__file__).resolve().parents[2] / "workers" / "engine"


@functools.cache
def code_version() -> str:
    """A digest of the engine's files and of the libraries that train: changes when the code does."""
    digest = hashlib.sha256()
    for path in sorted(p for p in _ENGINE_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(str(path.relative_to(_ENGINE_DIR)).encode() + b"\0" + path.read_bytes() + b"\0")
    for package in ("torch", "transformers"):
        try:
            digest.update(f"{package}={metadata.version(package)}\0".encode())
        except metadata.PackageNotFoundError:
            digest.update(f"{package}=none\0".encode())
    return digest.hexdigest()


def _resolve(path: str) -> Path:
    candidate = Path(path)
    return candidate if candidate.is_absolute() else Path(settings.ARTIFACT_ROOT) / candidate


@functools.lru_cache(maxsize=256)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def content_fingerprint(path: str, *, read_bytes: bool) -> str:
    """What a local path holds: a digest of its files (``read_bytes``: their bytes; otherwise their names,
    sizes and modification times). ``missing`` when nothing is there (the run fails the same way either
    way)."""
    root = _resolve(path)
    if not root.exists():
        return "missing"
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        name = file.name if file == root else str(file.relative_to(root))
        part = _file_digest(str(file), stat.st_size, stat.st_mtime_ns) if read_bytes \
            else f"{stat.st_size}:{stat.st_mtime_ns}"
        digest.update(f"{name}\0{part}\0".encode())
    return digest.hexdigest()


def _run_model_digest(path: str) -> str:
    """The sha256 the run recorded for its final model (``pending`` before it has one): a run's output changes
    only if it is trained again, and then it records a new one."""
    from experiments.domain.engine_config import RUN_OUTPUT_RE
    from experiments.models import Artifact

    match = RUN_OUTPUT_RE.fullmatch(path)
    if match is None:
        return content_fingerprint(path, read_bytes=False)
    recorded = (Artifact.objects.filter(run_id=int(match[1]), kind=Artifact.Kind.MODEL)
                .order_by("-created_at", "-id").values_list("sha256", flat=True).first())
    return recorded or "pending"


def _model_inputs(model: dict[str, Any] | None, found: list[str], memo: dict[str, str]) -> None:
    while model:
        path = model.get("path")
        if path:
            key = f"{model.get('source')}:{path}"
            if key not in memo:
                memo[key] = _run_model_digest(path) if model.get("source") == "run" \
                    else content_fingerprint(path, read_bytes=False)
            found.append(f"model:{key}:{memo[key]}")
        model = model.get("parent")


def config_digest(config: dict[str, Any], *, memo: dict[str, str] | None = None) -> str:
    """The run's content address (64 hex digits). ``memo``: fingerprints already taken (one launch shares
    one, so a model folder is read once for all its runs)."""
    memo = {} if memo is None else memo
    inputs: list[str] = []
    dataset = config.get("dataset") or {}
    for key in ("path", "eval_path"):
        if dataset.get(key):
            seen = f"data:{dataset[key]}"
            if seen not in memo:
                memo[seen] = content_fingerprint(dataset[key], read_bytes=True)
            inputs.append(f"data:{key}:{memo[seen]}")
    for model in (config.get("student"), config.get("teacher"), *(config.get("extra_teachers") or [])):
        _model_inputs(model, inputs, memo)
    canonical = json.dumps({"config": config, "inputs": inputs, "code": code_version()}, sort_keys=True,
                           separators=(",", ":"), ensure_ascii=True, allow_nan=True)
    return hashlib.sha256(canonical.encode()).hexdigest()
