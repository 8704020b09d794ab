"""Teacher-output stores as records: recording the cache entries a finished run filled or reused, and deleting
a store (its record and its files) when no queued or running run needs it.

A run's result lists the entries it used (``result["teacher_cache"]``, workers/engine/cache.py ``CacheUse``);
their manifests are read from disk before the run's transaction (:func:`store_facts`) and recorded inside it
(:func:`stores_record`), after the run's fenced transition, so only the delivery that owns the run writes.
Every key of a result and a manifest is read defensively: format-1 manifests lack ``k``, ``positions`` and
``bytes_per_token`` (they are read from the tensor file's header instead, where there is one).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from experiments.domain.engine_config import TEACHER_CACHE_DIR, split_key
from experiments.models import Artifact, Run, TeacherStore, TeacherStoreUse
from experiments.services import artifacts

logger = logging.getLogger(__name__)

ACTIVE = (Run.Status.QUEUED, Run.Status.RUNNING)
_KEY = re.compile(r"[0-9a-f]{64}")
_MAX_HEADER = 64 << 20  # a safetensors header larger than this is not one the engine wrote


@dataclass(frozen=True)
class StoreFacts:
    """One entry a run used, as read from its result and its folder (before the run's transaction)."""

    key: str
    split: str
    kind: str
    filled: bool
    waited: bool
    seconds: float
    path: str  # relative to ARTIFACT_ROOT
    size_bytes: int
    format: int
    k: int | None
    positions: int | None
    bytes_per_token: float | None
    teacher_fingerprint: str
    teacher_names: tuple[str, ...]
    vocab_digest: str
    max_length: int | None
    created_at: datetime | None
    compute_seconds: float | None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _count(value: Any) -> int | None:
    number = _number(value)
    return int(number) if number is not None and number >= 0 else None


def _tensor_shapes(file: Path) -> dict[str, list[int]]:
    """The tensors' shapes from a safetensors file's JSON header (the tensors themselves are not read)."""
    try:
        with file.open("rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            if not 0 < size <= _MAX_HEADER:
                return {}
            header = json.loads(fh.read(size))
    except (OSError, ValueError):
        return {}
    return {name: info["shape"] for name, info in header.items()
            if isinstance(info, dict) and isinstance(info.get("shape"), list)}


def _datetime(value: Any) -> datetime | None:
    try:
        return parse_datetime(value) if isinstance(value, str) else None
    except ValueError:
        return None


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def entry_facts(use: dict[str, Any]) -> StoreFacts | None:
    """The facts of one ``teacher_cache`` use of a result, or None when its folder is outside ARTIFACT_ROOT,
    its key is not a cache key or its manifest is unreadable (deleted since, or not an entry)."""
    key, path = use.get("key"), use.get("path")
    if not isinstance(key, str) or not _KEY.fullmatch(key) or not isinstance(path, str):
        return None
    folder = Path(path).resolve()
    if not folder.is_relative_to(Path(settings.ARTIFACT_ROOT).resolve()):
        return None
    manifest = _read_manifest(folder)
    if manifest is None or manifest.get("key", key) != key:
        return None
    stored = manifest.get("stored") if isinstance(manifest.get("stored"), dict) else {}
    stored = stored or (use.get("stored") if isinstance(use.get("stored"), dict) else {})
    description = manifest.get("description") if isinstance(manifest.get("description"), dict) else {}
    dataset = description.get("dataset") if isinstance(description.get("dataset"), dict) else {}
    kind = str(stored.get("kind") or "")
    shapes = _tensor_shapes(folder / "outputs.safetensors")
    per_position = {"topk": "logprobs", "generations": "tokens"}.get(kind)
    shape = shapes.get(per_position or "", [])  # format 1: (positions, k) or (positions,)
    k = _count(manifest.get("k")) or _count(stored.get("k"))
    if k is None and kind == "topk" and len(shape) == 2:
        k = _count(shape[1])
    positions = _count(manifest.get("positions"))
    if positions is None and shape:
        positions = _count(shape[0])
    size = _count(manifest.get("bytes")) or artifacts.du(folder) or _count(use.get("bytes")) or 0
    per_token = _number(manifest.get("bytes_per_token"))
    if per_token is None and positions and kind in ("topk", "generations"):
        per_token = size / positions
    teachers = manifest.get("teachers") if isinstance(manifest.get("teachers"), list) else []
    created = manifest.get("created")
    return StoreFacts(
        key=key,
        split=str(use.get("split") or manifest.get("split") or "")[:32],
        kind=kind,
        filled=not use.get("hit", True),
        waited=bool(use.get("waited")),
        seconds=_number(use.get("seconds")) or 0.0,
        path=artifacts.relative_artifact_path(folder),
        size_bytes=size,
        format=_count(manifest.get("format")) or 1,
        k=k,
        positions=positions,
        bytes_per_token=per_token,
        teacher_fingerprint=str(description.get("teacher") or ""),
        teacher_names=tuple(str(t) for t in teachers),
        vocab_digest=str(manifest.get("vocab_digest") or "")[:64],
        max_length=_count(dataset.get("max_length")),
        created_at=_datetime(created),
        compute_seconds=_number(manifest.get("compute_seconds")),
    )


def store_facts(result: dict[str, Any]) -> list[StoreFacts]:
    """The stores a run's result says it used, read from disk: call it before the run's transaction."""
    uses = result.get("teacher_cache") if isinstance(result, dict) else None
    if not isinstance(uses, list):
        return []
    facts = []
    for use in uses:
        found = entry_facts(use) if isinstance(use, dict) else None
        if found is None:
            logger.warning("teacher-cache entry %r of a result has no readable manifest; not recorded",
                           use.get("key") if isinstance(use, dict) else use)
        elif found.kind not in TeacherStore.Kind.values:
            logger.warning("teacher-cache entry %s stores %r: no store kind", found.key, found.kind)
        else:
            facts.append(found)
    return facts


def _random_init(model: dict[str, Any]) -> bool:
    """A model without weight files (a random init from a config, a builtin net, or one derived from them):
    the engine initialises a teacher like that with the run's seed, so its outputs depend on the seed."""
    while model.get("source") == "derived" and isinstance(model.get("parent"), dict):
        model = model["parent"]
    return model.get("source") in ("config", "builtin")


def config_match(config: dict[str, Any]) -> tuple[str, str]:
    """What identifies, in a frozen run config, the teacher outputs it reads: a digest of its teachers (main,
    extra, weights; the seed too for a randomly initialised teacher) and the dataset's split key (max length
    included). ("", "") for a run without a teacher."""
    if not config.get("teacher"):
        return "", ""
    models = [config["teacher"], *(config.get("extra_teachers") or [])]
    teachers = {"teacher": config["teacher"], "extra": config.get("extra_teachers") or [],
                "weights": config.get("teacher_weights") or []}
    if any(isinstance(m, dict) and _random_init(m) for m in models):
        teachers["seed"] = (config.get("train") or {}).get("seed")
    digest = hashlib.sha256(json.dumps(teachers, sort_keys=True).encode()).hexdigest()[:32]
    return digest, split_key(config.get("dataset") or {})


def config_topk(config: dict[str, Any]) -> int | None:
    """The k of a run's train top-k entry: the largest k its top-k terms ask for; None when it has none (the
    engine then keeps its evaluation k)."""
    from workers.engine.terms import LOSS_TERMS

    ks = [{**spec.defaults(), **(term.get("params") or {})}.get("k")
          for term in config.get("terms") or [] if (spec := LOSS_TERMS.get(term.get("name"))) is not None
          and spec.kind == "topk"]
    ks = [k for k in ks if isinstance(k, int)]
    return max(ks) if ks else None


def _revision(fingerprint: str, config_revision: str) -> str:
    """A hub commit (``hub:name@commit``), a short digest of the files or weights, or the configured
    revision."""
    if fingerprint.startswith("hub:") and "@" in fingerprint:
        return fingerprint.rsplit("@", 1)[1][:200]
    word, sep, digest = fingerprint.partition(":")
    named = {"files": "files", "state": "weights", "derived": "derived", "served": "served"}
    if sep and word in named:
        return f"{named[word]} {digest[:12]}"
    return config_revision


def _teacher_label(run: Run, facts: StoreFacts) -> str:
    if run.teacher_id and len(facts.teacher_names) <= 1:
        return run.teacher.name
    return " + ".join(facts.teacher_names) or (run.teacher.name if run.teacher_id else "teacher")


@transaction.atomic
def stores_record(*, run: Run, facts: list[StoreFacts], at: datetime | None = None) -> list[TeacherStore]:
    """Record the stores ``run`` used (at ``at``, default now) and its use of each, inside the transaction
    that fenced the run's own write (the caller checked that its delivery owns the run). Idempotent: a use is
    recorded once per run and key; a store's size and bytes/token follow its latest recording, its last use
    the latest use."""
    if not facts:
        return []
    now = at or timezone.now()
    teacher_cfg = (run.config or {}).get("teacher") or {}
    match_teacher, match_dataset = config_match(run.config or {})
    dataset = run.experiment.dataset
    recorded = []
    for fact in facts:
        measured = {"size_bytes": fact.size_bytes, "positions": fact.positions, "format": fact.format,
                    "bytes_per_token": fact.bytes_per_token, "k": fact.k, "path": fact.path,
                    "last_used_at": now}
        store, created = TeacherStore.objects.select_for_update().get_or_create(
            team_id=run.team_id, key=fact.key,
            defaults={
                **measured,
                "kind": fact.kind,
                "split": fact.split,
                "teacher_id": run.teacher_id,
                "teacher_label": _teacher_label(run, fact)[:300],
                "teacher_revision": _revision(fact.teacher_fingerprint, str(teacher_cfg.get("revision", ""))),
                "tokenizer": (run.teacher.tokenizer_id or run.teacher.hub_id if run.teacher_id else "")[:200],
                "vocab_digest": fact.vocab_digest,
                "dataset": dataset,
                "dataset_label": dataset.name[:200],
                "max_length": fact.max_length,
                "compute_seconds": fact.compute_seconds,
                "match_teacher": match_teacher,
                "match_dataset": match_dataset,
                "created_at": fact.created_at or now,
            },
        )
        if not created:
            measured["last_used_at"] = max(store.last_used_at, now)
            for name, value in measured.items():
                setattr(store, name, value)
            store.save(update_fields=list(measured))
        TeacherStoreUse.objects.get_or_create(
            run=run, key=fact.key,
            defaults={"store": store, "label": store.label[:400], "split": fact.split, "filled": fact.filled,
                      "waited": fact.waited, "seconds": fact.seconds, "used_at": now},
        )
        recorded.append(store)
    return recorded


def _needs(store: TeacherStore, config: dict[str, Any]) -> bool:
    """Whether a run with this frozen config would read ``store``: same teachers and dataset (max length
    included), and for a train top-k entry the same k."""
    if not store.match_teacher or config_match(config) != (store.match_teacher, store.match_dataset):
        return False
    if store.kind == TeacherStore.Kind.TOPK and store.split == "train" and store.k:
        wanted = config_topk(config)
        return wanted is None or wanted == store.k
    return True


def store_needed_by(*, store: TeacherStore, any_team: bool = False) -> list[Run]:
    """The queued or running runs of the store's team (of every team: ``any_team``) that need it: recorded as
    using it (a requeued run), or whose frozen config would produce its key."""
    active = Run.objects.filter(status__in=ACTIVE)
    if not any_team:
        active = active.filter(team_id=store.team_id)
    recorded = set(active.filter(teacher_store_uses__key=store.key).values_list("id", flat=True))
    candidates = active.only("id", "config", "status")
    return sorted((run for run in candidates if run.pk in recorded or _needs(store, run.config or {})),
                  key=lambda run: run.pk)


def _entry_folder(key: str) -> Path | None:
    """The store's folder, generated from its key (never from a stored path), inside the cache root."""
    if not _KEY.fullmatch(key):
        return None
    root = (Path(settings.ARTIFACT_ROOT) / TEACHER_CACHE_DIR).resolve()
    folder = (root / key).resolve()
    return folder if folder.is_relative_to(root) and folder != root else None


@dataclass(frozen=True)
class StoreDeletion:
    label: str
    freed_bytes: int
    files_kept: str  # why the files stay ("" when they were deleted)


@transaction.atomic
def store_delete(*, store: TeacherStore) -> StoreDeletion:
    """Delete a store: its record (its runs keep their use rows, marked deleted) and, after the commit, its
    files, unless another team's record or a queued or running run of another team still reads them.

    Raises ValidationError, naming the runs, while a queued or running run of the team needs it. A run
    launched after this check finds no entry and computes it again."""
    store = TeacherStore.objects.select_for_update().get(pk=store.pk)
    needing = store_needed_by(store=store)
    if needing:
        names = ", ".join(f"#{run.pk} ({run.status})" for run in needing[:10])
        more = f" and {len(needing) - 10} more" if len(needing) > 10 else ""
        raise ValidationError(
            f"Store {store.label} is needed by queued or running run{'s' if len(needing) > 1 else ''} "
            f"{names}{more}; cancel them or wait for them to finish, then delete it."
        )
    if TeacherStore.objects.filter(key=store.key).exclude(pk=store.pk).exists():
        kept = "another team's runs use the same teacher outputs"
    elif store_needed_by(store=store, any_team=True):
        kept = "a queued or running run of another team reads them"
    else:
        kept = ""
    TeacherStoreUse.objects.filter(store=store).update(store=None, store_deleted_at=timezone.now())
    label, size, key = store.label, store.size_bytes, store.key
    store.delete()
    folder = _entry_folder(key)
    if not kept and folder is not None:
        transaction.on_commit(lambda: shutil.rmtree(folder, ignore_errors=True))
    return StoreDeletion(label=label, freed_bytes=0 if kept else size, files_kept=kept)


def stores_backfill() -> tuple[int, int]:
    """Record the stores of runs that finished before stores were records (their ``teacher_cache``
    artifacts), oldest first, from each entry's manifest where it is still readable. Idempotent. Returns
    (runs recorded, uses skipped: entries deleted or unreadable)."""
    runs = (Run.objects.filter(status=Run.Status.SUCCEEDED, artifacts__kind=Artifact.Kind.TEACHER_CACHE)
            .distinct().select_related("experiment__dataset", "teacher").order_by("finished_at", "id"))
    recorded = skipped = 0
    for run in runs.iterator(chunk_size=200):
        uses = (run.result or {}).get("teacher_cache")
        facts = store_facts(run.result or {})
        skipped += (len(uses) if isinstance(uses, list) else 0) - len(facts)
        if stores_record(run=run, facts=facts, at=run.finished_at):
            recorded += 1
    return recorded, skipped
