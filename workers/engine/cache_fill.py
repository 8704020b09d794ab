"""A teacher-output cache entry filled while the first epoch trains (METHODS.md §4).

A run whose train-split entry is missing does not compute it before step 1. Each batch's teacher outputs are
computed when a batch first uses its rows, kept for the loss in the precision the entry stores (so the first
epoch trains on exactly what later epochs and later runs read) and appended to a partial entry,
``<root>/.partial-<key>/``, in chunk files (``chunk-r<rank>-<n>.safetensors``: the rows and their outputs,
each written whole by a rename). When the first epoch ends, the rows no batch used (the dropped tail of the
epoch's permutation, the validation slice) are computed, the entry is written as an up-front fill writes it,
and the partial folder is removed. A run that stops before (a short run, a cancel, a kill) leaves its chunks:
the next run with the same key, or the same run resumed, continues from them.

One run fills an entry at a time: the filler holds the entry's lock (the lock of an up-front fill) while it
fills. A run that finds the lock held keeps its batches' outputs in memory only; at the end of its first epoch
it reads the entry if it is finished by then, else completes its own copy (and writes it when the lock has
become free). With several ranks, rank 0 takes the lock, every rank writes the chunks of its own rows, rank 0
completes and writes the entry, then the other ranks read it.

``DISTILLWEB_TEACHER_CACHE_FILL=before`` restores the up-front fill (everything before step 1).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import IO, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from . import phases
from .cache import CACHE_FORMAT, MANIFEST_FILE, CacheEntry, CacheUse, TeacherCache, pack_positions
from .distributed import Ranks
from .errors import ConfigError
from .topk_store import as_stored

FILL_ENV = "DISTILLWEB_TEACHER_CACHE_FILL"
FLUSH_ROWS = 256  # rows buffered before a chunk is written (a kill loses at most these: they are recomputed)

Records = dict[int, dict[str, Tensor]]


def fill_mode() -> str:
    """``during`` (the first epoch fills the entry, the default) or ``before`` (an up-front fill)."""
    raw = os.environ.get(FILL_ENV, "during").strip().lower() or "during"
    if raw not in ("during", "before"):
        raise ConfigError(f"{FILL_ENV} must be 'during' or 'before', not '{raw}'.")
    return raw


# Outputs with one entry per predicted position (causal LM top-k); the others are one tensor per row.
_PER_POSITION = frozenset({"logprobs", "indices", "tail_logmass", "target_logprob", "prefix_end"})


def _pack(records: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Per-row records in one flat chunk: every row's tensors concatenated, with their ``offsets`` (a row's
    fixed-shape outputs count as one position)."""
    return pack_positions(
        [{k: v if k in _PER_POSITION else v.unsqueeze(0) for k, v in r.items()} for r in records]
    )


def _unpack(tensors: dict[str, Tensor]) -> Records:
    rows = tensors.pop("rows").tolist()
    offsets = tensors.pop("offsets").tolist()
    out: Records = {}
    for i, row in enumerate(rows):
        start, end = offsets[i], offsets[i + 1]
        out[row] = {k: (v[start:end] if k in _PER_POSITION else v[start]) for k, v in tensors.items()}
    return out


class TrainFill:
    """The train-split entry of ``key`` while the first epoch fills it.

    Args:
        cache: the run's teacher-output cache.
        key: the entry's key (as :meth:`TeacherCache.get_or_compute` would write it).
        n_rows: rows of the split; the entry is complete when every one has its outputs.
        compute: the teachers' outputs of some rows, one record per row (a teacher forward).
        assemble: the entry's tensors from every row's record, in row order.
        manifest: the fields recorded with the entry (as an up-front fill records them).
        until_step: the step at which the first epoch ends: the entry is completed there.
    """

    def __init__(
        self,
        cache: TeacherCache,
        key: str,
        *,
        n_rows: int,
        compute: Callable[[np.ndarray], Records],
        assemble: Callable[[list[dict[str, Tensor]]], dict[str, Tensor]],
        manifest: Callable[[], dict[str, Any]],
        split: str,
        stored: dict[str, Any],
        description: dict[str, Any],
        until_step: int,
        batch_size: int,
        ranks: Ranks | None = None,
        flush_rows: int | None = None,
    ) -> None:
        self.cache, self.key, self.n_rows = cache, key, n_rows
        self._compute, self._assemble, self._manifest = compute, assemble, manifest
        self.split, self.stored, self.description = split, stored, description
        self.until_step, self.batch_size = until_step, batch_size
        self.flush_rows = flush_rows or FLUSH_ROWS
        self.ranks = ranks or Ranks()
        self.folder = cache.root / f".partial-{key}"
        self.records: Records = {}
        self._buffer: list[int] = []
        self._lock: IO[str] | None = None
        self.seconds = 0.0  # teacher time spent filling
        self.entry: CacheEntry | None = None
        self.owner = self.ranks.flag(self._try_lock() if self.ranks.is_main else False)
        if self.owner:
            self.records.update(self._read_chunks())

    # --- the lock and the partial folder -------------------------------------------------------------------

    def _try_lock(self) -> bool:
        self.cache.root.mkdir(parents=True, exist_ok=True)
        handle = open(self.cache.root / f"{self.key}.lock", "a+")  # noqa: SIM115 (held across calls)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return False
        if self.cache.lookup(self.key) is not None:  # finished by another run between lookup and lock
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
            return False
        self._lock = handle
        return True

    def _unlock(self) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def _read_chunks(self) -> Records:
        records: Records = {}
        if self.folder.is_dir():
            for file in sorted(self.folder.glob("chunk-*.safetensors")):
                records.update(_unpack(load_file(file)))
        return records

    def _flush(self) -> None:
        """Write the buffered rows as one chunk (owner only; whole or not at all)."""
        if not self.owner or not self._buffer:
            self._buffer.clear()
            return
        rows = sorted(set(self._buffer))
        self._buffer.clear()
        tensors = _pack([self.records[r] for r in rows])
        tensors["rows"] = torch.as_tensor(rows, dtype=torch.int64)
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"chunk-r{self.ranks.rank}-{uuid.uuid4().hex[:12]}.safetensors"
        tmp = self.folder / f".{name}.tmp"
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
        os.replace(tmp, self.folder / name)

    # --- per batch -----------------------------------------------------------------------------------------

    def rows(self, rows: np.ndarray) -> list[dict[str, Tensor]]:
        """The records of ``rows`` (in order), computing (and keeping) those not filled yet."""
        new = [r for r in dict.fromkeys(rows.tolist()) if r not in self.records]
        missing = np.asarray(new, dtype=np.int64)
        if len(missing):
            started = time.perf_counter()
            self.records.update(self._compute(missing))
            self.seconds += time.perf_counter() - started
            self._buffer.extend(missing.tolist())
            if len(self._buffer) >= self.flush_rows:
                self._flush()
        return as_stored([self.records[r] for r in rows.tolist()])

    def due(self, step: int) -> bool:
        return self.entry is None and step >= self.until_step

    # --- the end of the first epoch ------------------------------------------------------------------------

    def complete(self) -> CacheEntry:
        """The finished entry: every rank's chunks written, the missing rows computed and the entry written by
        rank 0 (the others read it); when another run holds the lock, an in-memory copy of this run's own."""
        self._flush()
        self.ranks.barrier()
        shared = False
        if self.ranks.is_main:
            self.entry = None if self.owner else self.cache.lookup(self.key)
            if self.entry is None:
                if self.owner:  # the other ranks' rows
                    self.records = self._read_chunks() | self.records
                self._fill_missing()
                self.entry = self._write() if self.owner or self._try_lock() else self._in_memory()
            shared = (self.entry.path / MANIFEST_FILE).is_file()
        if self.ranks.flag(shared):
            self.entry = self.entry if self.ranks.is_main else self.cache.lookup(self.key)
        elif not self.ranks.is_main:
            self._fill_missing()
            self.entry = self._in_memory()
        self.records.clear()
        return self.entry

    def _fill_missing(self) -> None:
        missing = np.asarray([r for r in range(self.n_rows) if r not in self.records], dtype=np.int64)
        with phases.within(phases.TEACHER_CACHE):
            phases.report(phases.TEACHER_CACHE, 0, len(missing))
            for start in range(0, len(missing), self.batch_size):
                began = time.perf_counter()
                self.records.update(self._compute(missing[start : start + self.batch_size]))
                self.seconds += time.perf_counter() - began
                phases.report(phases.TEACHER_CACHE, min(start + self.batch_size, len(missing)), len(missing))

    def _entry_manifest(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "format": CACHE_FORMAT,
            "split": self.split,
            "stored": self.stored,
            "description": self.description,
            "created": datetime.now(UTC).isoformat(),
            "compute_seconds": self.seconds,
            "filled_during_training": True,
            **self._manifest(),
        }

    def _write(self) -> CacheEntry:
        """Write the entry (holding the lock), record its use (the teacher's time and the write's), drop the
        partial folder, free the lock."""
        self._lock_held_or_raise()
        started = time.perf_counter()
        tensors = self._assemble([self.records[r] for r in range(self.n_rows)])
        try:
            entry = self.cache._write(self.key, tensors, self._entry_manifest())
            seconds = self.seconds + time.perf_counter() - started
            self.cache.uses.append(
                CacheUse.of(entry, self.split, self.stored, hit=False, seconds=seconds, waited=False)
            )
            shutil.rmtree(self.folder, ignore_errors=True)
        finally:
            self._unlock()
        return entry

    def _lock_held_or_raise(self) -> None:
        if self._lock is None:
            raise RuntimeError("writing a teacher-cache entry without its lock")

    def _in_memory(self) -> CacheEntry:
        """An entry this run keeps to itself (another run holds the lock): the same tensors, not written."""
        tensors = self._assemble([self.records[r] for r in range(self.n_rows)])
        if "offsets" in tensors:  # an LM top-k: the values a written entry would give back
            rest = as_stored([{k: v for k, v in tensors.items() if k != "offsets"}])[0]
            tensors = {"offsets": tensors["offsets"], **rest}
        return CacheEntry(self.key, self.folder, {"stored": self.stored, **self._manifest()}, tensors)

    def close(self) -> None:
        """The run ends before the entry is complete: keep what was computed for the next run, free the
        lock."""
        if self.entry is None:
            self._flush()
        self._unlock()
