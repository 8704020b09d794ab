"""The teacher-output cache (METHODS.md §4): teacher outputs computed once, reused by every run with the same
key.

An entry is a folder ``<root>/<key>/`` holding ``manifest.json`` and its outputs: ``outputs.safetensors``
(format 1), or for a causal-LM top-k entry written since format 2, a sharded, memory-mapped store
(:mod:`.topk_store`: ``index.json``, ``offsets.bin``, ``shard-*.bin``; 149 B of top-k a position at k = 64
and a 49k vocabulary, against 386 B in format 1). Format-1 top-k entries still read as before, and
:meth:`TeacherCache.upgrade` (the ``upgrade_teacher_cache`` command) rewrites them as format 2 in place.
The key is the sha256 of a JSON description of everything that decides the outputs:

- the teacher: a digest of its weight and tokenizer files (or of its state dict when it has no files, e.g. a
  random-init builtin net), and for ``multi_teacher`` every teacher with its weight;
- the dataset settings that decide the inputs: source, name, path (and a digest of the file or folder
  contents), columns, split seed, eval fraction, max length, task; never ``labelled_fraction`` (it hides
  labels, the inputs stay the same);
- the split (``train`` / ``eval``) and what is stored (``logits``; ``topk`` with k and the tail;
  ``embeddings``; ``generations`` with the decoding settings).

What an entry stores (float16 where noted; row ``i`` of the split is entry row ``i``; format 1's tensors:
format 2 holds the same per position in its own encoding, see :mod:`.topk_store`):

- classification ``logits``: ``logits`` (N, C) float32;
- causal LM ``topk``: per predicted position (positions 0..len-2 of each row, i.e. already shifted), flat over
  the split: ``logprobs`` (P, k) float16, ``indices`` (P, k) int32, ``tail_logmass`` (P,) float16 (log of the
  mass outside the top k), ``target_logprob`` (P,) float32 (the teacher's log-probability of the actual next
  token, for its perplexity); ``offsets`` (N+1,) int64 say where each row's positions start; train entries of
  unpacked text also ``prefix_end`` (P,) int64, the character offset where the text the teacher has read at
  each position ends (:mod:`.align`), so a student with another tokenizer can pair its positions with them;
- ``embeddings``: (N, D) float32;
- ``generations`` (seq_kd): ``tokens`` (P,) int32 prompt + continuation, ``offsets`` (N+1,),
  ``prompt_lengths``.

Writes are atomic (a temporary folder renamed into place). Runs that need the same missing key take an
exclusive ``fcntl.flock`` on ``<root>/<key>.lock``: the first computes, the others wait and then read.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from . import topk_store
from .config import DatasetConfig, ModelConfig
from .loss_primitives import TopK
from .topk_store import TopkStore

# The version of the key (part of every key: changing it orphans every entry). An entry's own manifest says
# its storage format: 1 (``outputs.safetensors``) or :data:`topk_store.FORMAT` (a sharded top-k store).
CACHE_FORMAT = 1
OUTPUTS_FILE = "outputs.safetensors"
MANIFEST_FILE = "manifest.json"
# Top-k of the teacher kept for LM evaluation (fidelity metrics), independent of any training term's k.
EVAL_TOPK = 64
# Padding rows of a gathered top-k: a valid, finite distribution (uniform over the k entries, tiny tail), so a
# masked position can never turn into NaN inside a loss.
_PAD_TAIL = 1e-6
_MIN_TAIL = 1e-12

_file_digests: dict[tuple[str, int, int], str] = {}
_digest_lock = threading.Lock()


# --- keys ---------------------------------------------------------------------------------------------------


def cache_key(description: dict[str, Any]) -> str:
    """sha256 (hex) of the canonical JSON of ``description``. A top-k entry written with
    ``DISTILLWEB_TOPK_STORE=float32`` (the uncompressed reference) has keys of its own; format 1 and format 2
    entries share theirs (format 2 is format 1's outputs, stored compactly)."""
    keyed = {"format": CACHE_FORMAT, **description}
    if (description.get("stored") or {}).get("kind") == "topk" and topk_store.store_mode() == "float32":
        keyed["store"] = "float32"
    canonical = json.dumps(keyed, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def digest_path(path: str | Path) -> str:
    """sha256 over a file's bytes, or over a folder's files (relative names and bytes, sorted; hidden files
    and links skipped). Memoised per (path, size, mtime), so a large weight file is read once per process."""
    path = Path(path)
    if path.is_file():
        return _digest_file(path)
    h = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and not p.is_symlink()):
        rel = file.relative_to(path)
        if any(part.startswith(".") for part in rel.parts):
            continue
        h.update(str(rel).encode() + b"\0" + _digest_file(file).encode())
    return h.hexdigest()


def _digest_file(path: Path) -> str:
    stat = path.stat()
    memo = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _digest_lock:
        if memo in _file_digests:
            return _file_digests[memo]
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    with _digest_lock:
        _file_digests[memo] = h.hexdigest()
    return _file_digests[memo]


def state_dict_digest(module: nn.Module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def vocab_digest(tokenizer: Any) -> str | None:
    """sha256 of a tokenizer's vocabulary (token → id), or None for feature models without one."""
    if tokenizer is None:
        return None
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def model_files_fingerprint(cfg: ModelConfig) -> str | None:
    """A digest of a model's weights and tokenizer that needs no model load, or None when only loading it
    tells.

    Local folders (``run`` sources, ``hf`` paths) are digested file by file; a hub id pinned to a commit, or
    one found in the local hub cache while offline, is named by its commit; a ``derived`` model by its
    parent's fingerprint and its derive parameters. Builtin and ``config`` models have no files: None.
    """
    if cfg.source == "run" or (cfg.source == "hf" and cfg.path):
        folder = Path(cfg.path)
        return f"files:{digest_path(folder)}" if folder.exists() else None
    if cfg.source == "hf" and cfg.name:  # a hub id, never a local folder (see .sources)
        commit = _hub_commit(cfg.name, cfg.revision)
        return f"hub:{cfg.name}@{commit}" if commit else None
    if cfg.source == "derived" and cfg.parent is not None:
        parent = model_files_fingerprint(cfg.parent)
        if parent is None:
            return None
        return "derived:" + cache_key({"parent": parent, "params": cfg.params, "num_labels": cfg.num_labels})
    return None


def _hub_commit(name: str, revision: str) -> str | None:
    if len(revision) == 40 and all(c in "0123456789abcdef" for c in revision):
        return revision
    try:
        from huggingface_hub import constants, try_to_load_from_cache
    except ImportError:
        return None
    if not constants.HF_HUB_OFFLINE:
        return None  # "main" on the hub may be newer than the local copy: only a load tells which one runs
    found = try_to_load_from_cache(name, "config.json", revision=revision or "main")
    return Path(found).parent.name if isinstance(found, str) else None


def dataset_description(cfg: DatasetConfig, *, task: str, max_length: int) -> dict[str, Any]:
    """The dataset settings that decide which rows a split holds and how they are cut (labelled_fraction left
    out: it hides labels and changes no input). ``max_length`` is the effective one (capped by the model)."""
    description: dict[str, Any] = {
        "source": cfg.source,
        "name": cfg.name,
        "path": cfg.path,
        "text_column": cfg.text_column,
        "eval_fraction": cfg.eval_fraction,
        "split_seed": cfg.split_seed,
        "max_length": max_length,
        "task": task,
    }
    if task == "classification":
        description["label_column"] = cfg.label_column  # the stratified split depends on the labels
    if cfg.path and Path(cfg.path).exists():
        description["content"] = digest_path(cfg.path)
    if cfg.pack:
        description["pack"] = True
    if cfg.eval_path:
        description["eval_path"] = cfg.eval_path
        if Path(cfg.eval_path).exists():
            description["eval_content"] = digest_path(cfg.eval_path)
    if cfg.source == "builtin" and cfg.name == "fortunes":
        from .data import fortune_files, fortunes_dir

        folder = fortunes_dir()
        if folder.is_dir():
            h = hashlib.sha256()
            for file in fortune_files(folder):
                h.update(file.name.encode() + b"\0" + _digest_file(file).encode())
            description["content"] = h.hexdigest()
    return description


# --- entries ------------------------------------------------------------------------------------------------


@dataclass
class CacheEntry:
    """A stored entry: its folder, manifest and tensors (on the CPU). A format-2 top-k entry has its
    ``store`` (read by rows: :func:`gather_topk`, :func:`gather_rows`) and as ``tensors`` only its offsets and
    side fields (:class:`.topk_store.StoreTensors`)."""

    key: str
    path: Path
    manifest: dict[str, Any]
    tensors: Mapping[str, Tensor]
    store: TopkStore | None = None

    def extra(self, name: str) -> dict[str, Any] | None:
        """A JSON side file written later with :meth:`TeacherCache.write_extra`, or None."""
        file = self.path / f"extra-{name}.json"
        return json.loads(file.read_text()) if file.is_file() else None


@dataclass
class CacheUse:
    """How one entry was obtained by a run (reported in ``TrainResult.teacher_cache``)."""

    key: str
    split: str
    stored: dict[str, Any]
    hit: bool
    seconds: float  # compute time on a miss, read time (plus any wait) on a hit
    path: str
    bytes: int
    waited: bool = False  # another run held the lock: this one waited for it, then read its entry
    format: int = CACHE_FORMAT  # the entry's storage format (manifest "format")
    bytes_per_token: float | None = None  # format-2 entries: the store's bytes per position

    @classmethod
    def of(
        cls, entry: CacheEntry, split: str, stored: dict[str, Any], *, hit: bool, seconds: float, waited: bool
    ) -> CacheUse:
        size = sum(f.stat().st_size for f in entry.path.iterdir() if f.is_file())
        fmt = int(entry.manifest.get("format", CACHE_FORMAT))
        per_token = entry.manifest.get("bytes_per_token")
        return cls(entry.key, split, stored, hit, seconds, str(entry.path), size, waited, fmt, per_token)

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "split": self.split,
            "stored": self.stored,
            "hit": self.hit,
            "seconds": self.seconds,
            "path": self.path,
            "bytes": self.bytes,
            "waited": self.waited,
            "format": self.format,
            "bytes_per_token": self.bytes_per_token,
        }


@dataclass
class TeacherCache:
    """Entries under ``root``; safe for several processes and threads sharing it."""

    root: Path
    uses: list[CacheUse] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    def lookup(self, key: str) -> CacheEntry | None:
        folder = self.root / key
        if not (folder / MANIFEST_FILE).is_file():
            return None
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
        if (folder / topk_store.INDEX_FILE).is_file():
            store = TopkStore(folder)
            return CacheEntry(key, folder, manifest, store.tensors, store)
        return CacheEntry(key, folder, manifest, load_file(folder / OUTPUTS_FILE))

    def get_or_compute(
        self,
        key: str,
        compute: Callable[[], tuple[dict[str, Tensor], dict[str, Any]]],
        *,
        split: str,
        stored: dict[str, Any],
        description: dict[str, Any],
    ) -> CacheEntry:
        """The entry for ``key``, computing it with ``compute()`` (→ tensors, extra manifest fields) if
        missing.

        Concurrent callers with the same key compute it once: an exclusive lock on ``<key>.lock`` is held
        while computing; the others block on it and then read the finished entry.
        """
        started = time.perf_counter()
        entry = self.lookup(key)
        waited = False
        if entry is None:
            with self._locked(key) as had_to_wait:
                entry = self.lookup(key)  # computed by another run while this one waited
                waited = had_to_wait and entry is not None
                if entry is None:
                    tensors, extra = compute()
                    manifest = {
                        "key": key,
                        "format": CACHE_FORMAT,
                        "split": split,
                        "stored": stored,
                        "description": description,
                        "created": datetime.now(UTC).isoformat(),
                        "compute_seconds": time.perf_counter() - started,
                        **extra,
                    }
                    entry = self._write(key, tensors, manifest)
                    self._record(entry, split, stored, hit=False, started=started)
                    return entry
        self._record(entry, split, stored, hit=True, started=started, waited=waited)
        return entry

    def write_extra(self, entry: CacheEntry, name: str, data: dict[str, Any]) -> None:
        """Atomically add (or replace) a JSON side file to a finished entry, e.g. measured teacher speeds."""
        tmp = entry.path / f".extra-{name}.{os.getpid()}.{threading.get_ident()}.tmp"
        tmp.write_text(json.dumps(data, sort_keys=True))
        os.replace(tmp, entry.path / f"extra-{name}.json")

    def _record(
        self,
        entry: CacheEntry,
        split: str,
        stored: dict[str, Any],
        *,
        hit: bool,
        started: float,
        waited: bool = False,
    ) -> None:
        seconds = time.perf_counter() - started
        self.uses.append(CacheUse.of(entry, split, stored, hit=hit, seconds=seconds, waited=waited))

    @contextlib.contextmanager
    def _locked(self, key: str) -> Iterator[bool]:
        """Hold the exclusive lock of ``key``; yields whether another holder made this one wait."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f"{key}.lock", "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                had_to_wait = False
            except BlockingIOError:
                fcntl.flock(handle, fcntl.LOCK_EX)
                had_to_wait = True
            try:
                yield had_to_wait
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _write(self, key: str, tensors: dict[str, Tensor], manifest: dict[str, Any]) -> CacheEntry:
        final = self.root / key
        tmp = self.root / f".tmp-{key}-{os.getpid()}-{threading.get_ident()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        compact = topk_store.is_lm_topk(tensors) and topk_store.store_mode() == "compact"
        if compact:
            vocab = (manifest.get("teacher_dims") or {}).get("vocab_size")
            manifest = {**manifest, **topk_store.write_store(tmp, tensors, vocab_size=vocab)}
        else:
            if topk_store.is_lm_topk(tensors):  # the float32 reference: format 1 with float32 values
                tensors |= {k: tensors[k].float() for k in ("logprobs", "tail_logmass") if k in tensors}
            save_file(tensors, tmp / OUTPUTS_FILE)
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        shutil.rmtree(final, ignore_errors=True)  # a stale half entry (no manifest) from a crashed writer
        os.replace(tmp, final)
        if compact:
            store = TopkStore(final)
            return CacheEntry(key, final, manifest, store.tensors, store)
        return CacheEntry(key, final, manifest, tensors)

    def upgrade(self, *, dry_run: bool = False, log: Callable[[str], None] = print) -> dict[str, int]:
        """Rewrite every format-1 LM top-k entry under the root as format 2, in place, each under its key's
        lock (a run that needs the entry meanwhile waits, then reads the new one). Logs a line per entry;
        returns the counts of entries, entries ``to_convert`` and ``converted``, and the bytes before and
        after."""
        folders = sorted(p for p in self.root.glob("*") if (p / MANIFEST_FILE).is_file())
        todo = [p for p in folders if not (p / topk_store.INDEX_FILE).is_file() and _holds_topk(p)]
        counts = dict(entries=len(folders), to_convert=len(todo), converted=0, bytes_before=0, bytes_after=0)
        for n, folder in enumerate(todo, 1):
            before = (folder / OUTPUTS_FILE).stat().st_size
            if dry_run:
                log(f"[{n}/{len(todo)}] {folder.name}: format 1, {before:,} bytes (would convert)")
                continue
            started = time.perf_counter()
            with self._locked(folder.name):
                fields = topk_store.convert_entry(
                    folder, outputs_file=OUTPUTS_FILE, manifest_file=MANIFEST_FILE
                )
            if fields is None:  # converted by another process meanwhile
                continue
            counts["converted"] += 1
            counts["bytes_before"] += before
            counts["bytes_after"] += fields["bytes"]
            log(
                f"[{n}/{len(todo)}] {folder.name}: {before:,} → {fields['bytes']:,} bytes "
                f"({fields['bytes_per_token']:.1f} B/token, {time.perf_counter() - started:.1f} s)"
            )
        return counts


# --- sparse LM outputs --------------------------------------------------------------------------------------


def entry_tensors(folder: str | Path) -> dict[str, Tensor]:
    """Every tensor of the entry in ``folder``, whatever its format (format 2 decoded whole, laid out as
    format 1): for tools and tests; a run reads a format-2 entry by rows."""
    folder = Path(folder)
    if (folder / topk_store.INDEX_FILE).is_file():
        return TopkStore(folder).read_all()
    return load_file(folder / OUTPUTS_FILE)


def _holds_topk(folder: Path) -> bool:
    """Whether an entry folder holds a format-1 LM top-k (reads the outputs file's header only)."""
    from safetensors import safe_open

    if not (folder / OUTPUTS_FILE).is_file():
        return False
    with safe_open(folder / OUTPUTS_FILE, framework="pt") as f:
        return topk_store.is_lm_topk(dict.fromkeys(f.keys()))


def topk_of(logits: Tensor, k: int) -> TopK:
    """The top-k of ``log_softmax(logits)`` (float32) with the log of the remaining mass.

    Args:
        logits: (..., V).
    Returns:
        TopK with logprobs (..., k) descending, indices (..., k), tail_logmass (...).
    """
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    k = min(k, log_probs.shape[-1])
    values, indices = log_probs.topk(k, dim=-1)
    kept = torch.logsumexp(values, dim=-1)  # log of the top-k mass, <= 0
    tail = torch.log((-torch.expm1(kept)).clamp_min(_MIN_TAIL))  # log(1 − top-k mass), finite
    return TopK(values, indices, tail)


def pack_positions(per_row: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Concatenate per-row (n_i, ...) tensors into flat (P, ...) tensors plus ``offsets`` (N+1,)."""
    lengths = [next(iter(r.values())).shape[0] for r in per_row]
    offsets = torch.zeros(len(per_row) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(torch.as_tensor(lengths, dtype=torch.long), 0)
    names = per_row[0].keys() if per_row else ()
    return {"offsets": offsets, **{name: torch.cat([r[name] for r in per_row]) for name in names}}


def _row_positions(offsets: Tensor, rows: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """Flat positions of ``rows`` laid out as (B, width), and which of them exist (a row may be shorter than
    ``width``; missing positions point at position 0 and are False)."""
    rows = torch.as_tensor(rows).to("cpu", torch.long).reshape(-1)  # the entry's tensors are on the CPU
    starts, ends = offsets[rows], offsets[rows + 1]  # (B,)
    position = starts.unsqueeze(1) + torch.arange(width, dtype=torch.long)  # (B, width)
    valid = position < ends.unsqueeze(1)
    return torch.where(valid, position, 0), valid


def _read(stored: Tensor, position: Tensor) -> Tensor:
    """``stored[position]`` for (B, width) flat positions, in one indexed read: (B, width, ...)."""
    if not len(stored):  # an entry without positions: everything is padding
        return stored.new_zeros((*position.shape, *stored.shape[1:]))
    return stored.index_select(0, position.reshape(-1)).view(*position.shape, *stored.shape[1:])


def gather_topk(entry: CacheEntry, rows: Tensor, width: int, device: torch.device) -> TopK:
    """The cached top-k of ``rows`` laid out like a batch: (B, width, k), padding positions filled with a
    valid dummy distribution (they are masked by the labels).

    One indexed read per stored tensor (no Python loop over rows); the float16 values are widened to float32
    and the indices to int64 after the read, on the ``device``. A format-2 entry decodes just those rows'
    positions, from the shards that hold them."""
    if entry.store is not None:
        return _gather_stored(entry.store, rows, width, device)
    t = entry.tensors
    k = t["logprobs"].shape[1]
    position, valid = _row_positions(t["offsets"], rows, width)
    ok = valid.to(device).unsqueeze(-1)
    logprobs = _read(t["logprobs"], position).to(device).float()
    indices = _read(t["indices"], position).to(device).long()
    padded = not bool(valid.all())  # full rows (packed text, long rows) need no padding
    if padded:
        logprobs = torch.where(ok, logprobs, math.log((1 - _PAD_TAIL) / k))
        indices = torch.where(ok, indices, torch.arange(k, dtype=torch.long, device=device))
    tail = None
    if "tail_logmass" in t:
        tail = _read(t["tail_logmass"], position).to(device).float()
        if padded:
            tail = torch.where(ok.squeeze(-1), tail, math.log(_PAD_TAIL))
    return TopK(logprobs, indices, tail)


def _gather_stored(store: TopkStore, rows: Tensor, width: int, device: torch.device) -> TopK:
    """:func:`gather_topk` of a format-2 entry: only the valid positions are decoded; the padding is the same
    dummy distribution."""
    k = store.codec.k
    position, valid = _row_positions(store.offsets, rows, width)
    values, ids, tail = store.read(position[valid].numpy())
    logprobs = torch.full((*position.shape, k), math.log((1 - _PAD_TAIL) / k))
    indices = torch.arange(k, dtype=torch.long).expand(*position.shape, k).clone()
    logprobs[valid], indices[valid] = torch.from_numpy(values), torch.from_numpy(ids)
    out_tail = None
    if tail is not None:
        out_tail = torch.full(position.shape, math.log(_PAD_TAIL))
        out_tail[valid] = torch.from_numpy(tail)
        out_tail = out_tail.to(device)
    return TopK(logprobs.to(device), indices.to(device), out_tail)


def gather_rows(entry: CacheEntry, name: str, rows: Tensor, width: int, fill: float = 0.0) -> Tensor:
    """A flat per-position tensor (``target_logprob``) laid out as (B, width)."""
    if entry.store is not None:
        position, valid = _row_positions(entry.store.offsets, rows, width)
        values = torch.full(position.shape, fill, dtype=torch.float32)
        values[valid] = torch.from_numpy(entry.store.read_side(name, position[valid].numpy())).float()
        return values
    t = entry.tensors
    position, valid = _row_positions(t["offsets"], rows, width)
    values = _read(t[name], position).float()
    return torch.where(valid, values, fill)


def row_tokens(entry: CacheEntry) -> tuple[list[list[int]], list[int]]:
    """Token rows and prompt lengths of a ``generations`` entry."""
    t = entry.tensors
    offsets = t["offsets"].tolist()
    flat = t["tokens"].tolist()
    rows = [flat[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
    return rows, [int(x) for x in t["prompt_lengths"].tolist()]
