"""Format 2 of a causal-LM top-k teacher-output entry (METHODS.md §4): compact, sharded, memory-mapped.

Per predicted position one fixed-size record of bits (little-endian bit order, rounded up to whole bytes):

- the k token ids, ``⌈log₂ V⌉`` bits each (V the teacher's vocabulary);
- the top log-probability ``l₀`` and the tail ``log(1 − top-k mass)``, float16 each (as format 1 stores them);
- a per-position step scale ``Δ = 2^((s − 48) / 4)`` nats, :data:`SCALE_BITS` bits;
- the other k − 1 log-probabilities (sorted descending) as closed-loop gaps: with ``xᵢ = l₀ − lᵢ`` and ``x̂``
  what the decoder rebuilds (``x̂ᵢ = x̂ᵢ₋₁ + Δ·level(qᵢ)``), rank i stores the code ``qᵢ`` whose level is
  nearest ``(xᵢ − x̂ᵢ₋₁) / Δ``, so errors never pile up. Rank 1 gets 6 bits, ranks 2–4 5, 5–8 4 (levels
  0, 1, 2, …), 9–40 2 bits (levels 0, 1, 3, 8) and the rest 1 bit (0, 2): the spread levels catch up with a
  sudden drop down the ranking within a few ranks. The encoder tries the scales (every 4th, then the 7
  around the best) and keeps the one with the least error weighted by the larger of the true and the
  rebuilt probability, ``Σ max(pᵢ, p̂ᵢ)·(x̂ᵢ − xᵢ)²`` (a rank rebuilt too likely costs as much as one rebuilt
  too unlikely).

On SmolLM2-135M's top-64 over 4,096 fortune-text positions the decoded distribution (top-k + tail) is
within a mean KL of 1e-4 nats (p99 4e-4) of the float32 one (benchmarks/store_fidelity.py measures it).
At k = 64 and V = 49,152 a record is 128 B of ids + 21 B of values = 149 B; the side data each position keeps
as format 1 does (``target_logprob`` float32, 4 B; ``prefix_end`` int64, 8 B, train entries of unpacked text
only) and the row offsets (8 B a row) are stored beside it, uncompressed, and counted in the entry's
``bytes_per_token`` (``bytes_per_token_topk`` counts the records alone).

An entry folder holds ``index.json`` (codec, k, vocabulary, shards with their rows, positions, byte size and
sha256), ``offsets.bin`` (int64, rows + 1) and ``shard-NNNNN.bin`` files, each whole rows of about
:data:`SHARD_POSITIONS` positions: the records, then ``target_logprob``, then ``prefix_end``. Readers map the
files (``numpy.memmap``) and decode only the positions a batch asks for; a shard's sha256 is checked once per
process, when it is first opened. ``DISTILLWEB_TOPK_STORE=float32`` writes format 1 with float32 values
instead (the uncompressed reference the fidelity benchmark compares with).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import ConfigError

FORMAT = 2
INDEX_FILE = "index.json"
OFFSETS_FILE = "offsets.bin"
STORE_ENV = "DISTILLWEB_TOPK_STORE"
SHARD_POSITIONS = 1 << 16
SCALE_BITS = 6
CODEC = "gap-dpcm-1"
_SIDE = {"target_logprob": np.float32, "prefix_end": np.int64}
_ENCODE_CHUNK = 4096

_verified: set[tuple[str, int, int]] = set()
_verified_lock = threading.Lock()


def store_mode() -> str:
    """``compact`` (format 2, the default) or ``float32`` (format 1 with float32 values, for comparisons)."""
    raw = os.environ.get(STORE_ENV, "compact").strip().lower() or "compact"
    if raw not in ("compact", "float32"):
        raise ConfigError(f"{STORE_ENV} must be 'compact' or 'float32', not '{raw}'.")
    return raw


class StoreError(RuntimeError):
    """A format-2 entry that cannot be read as written (a changed or truncated shard)."""


# --- the codec ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Codec:
    """The bit layout of one position's record for ``k`` ids of ``id_bits`` bits."""

    k: int
    id_bits: int
    tail: bool = True

    @functools.cached_property
    def gap_bits(self) -> np.ndarray:
        """Bits of the gap of ranks 1..k−1."""
        rank = np.arange(1, self.k)
        return np.select([rank == 1, rank <= 4, rank <= 8, rank <= 40], [6, 5, 4, 2], 1)

    @functools.cached_property
    def level_table(self) -> np.ndarray:
        """(k−1, 2^bits): the gap multiple each code of each rank stands for (:func:`_levels`)."""
        table = np.zeros((self.k - 1, 1 << int(self.gap_bits.max(initial=0))), dtype=np.float32)
        for i, bits in enumerate(self.gap_bits):
            levels = _levels(int(bits))
            table[i, : len(levels)] = levels
        return table

    @functools.cached_property
    def fields(self) -> list[tuple[int, int]]:
        """(count, bits) of each field in record order: ids, l₀, tail, scale, then the gaps, one field per run
        of ranks with the same width."""
        out = [(self.k, self.id_bits), (1, 16)]
        if self.tail:
            out.append((1, 16))
        out.append((1, SCALE_BITS))
        for bits in self.gap_bits:
            if out[-1][1] == bits and len(out) > 3 + self.tail:
                out[-1] = (out[-1][0] + 1, int(bits))
            else:
                out.append((1, int(bits)))
        return out

    @functools.cached_property
    def record_bytes(self) -> int:
        return -(-sum(n * b for n, b in self.fields) // 8)

    def encode(self, logprobs: np.ndarray, indices: np.ndarray, tail: np.ndarray | None) -> np.ndarray:
        """(P, k) log-probs (any float), (P, k) ids, (P,) tail → (P, record_bytes) uint8."""
        out = np.empty((len(logprobs), self.record_bytes), dtype=np.uint8)
        for start in range(0, len(logprobs), _ENCODE_CHUNK):
            stop = start + _ENCODE_CHUNK
            out[start:stop] = self._encode(
                logprobs[start:stop], indices[start:stop], None if tail is None else tail[start:stop]
            )
        return out

    def _encode(self, logprobs: np.ndarray, indices: np.ndarray, tail: np.ndarray | None) -> np.ndarray:
        values = np.asarray(logprobs, dtype=np.float32)
        order = np.argsort(-values, axis=1, kind="stable")  # descending; ties keep their order
        values = np.take_along_axis(values, order, 1).astype(np.float64)
        ids = np.take_along_axis(np.asarray(indices, dtype=np.int64), order, 1)
        if ids.size and (ids.min() < 0 or ids.max() >= 1 << self.id_bits):
            raise ValueError(f"token ids outside 0..{(1 << self.id_bits) - 1}")
        top = np.clip(values[:, 0], -60000, 0).astype(np.float16)
        x = np.clip(top.astype(np.float64)[:, None] - values[:, 1:], 0, 1e4)  # (P, k−1)
        # every 4th scale first, then the 7 around the best of those
        coarse = np.broadcast_to(np.arange(0, 1 << SCALE_BITS, 4), (len(x), 1 << (SCALE_BITS - 2)))
        error, _ = self._gaps(x, top, coarse)
        around = coarse[np.arange(len(x)), np.argmin(error, axis=1)][:, None] + np.arange(-3, 4)
        fine = np.clip(around, 0, (1 << SCALE_BITS) - 1)
        error, codes = self._gaps(x, top, fine)
        pick = np.argmin(error, axis=1)  # the first of equals
        best = fine[np.arange(len(x)), pick]
        gaps = codes[:, np.arange(len(x)), pick].T  # (P, k−1)
        fields: list[np.ndarray] = [ids, top.view(np.uint16)[:, None]]
        if self.tail:
            tail16 = np.clip(np.asarray(tail, dtype=np.float32), -60000, 0).astype(np.float16)
            fields.append(tail16.view(np.uint16)[:, None])
        fields.append(best[:, None])
        start = 0
        for count, _bits in self.fields[len(fields) :]:
            fields.append(gaps[:, start : start + count])
            start += count
        return _pack_bits(fields, self.fields, self.record_bytes)

    def _gaps(self, x: np.ndarray, top: np.ndarray, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The closed-loop gap codes of ``x`` (P, k−1) for each candidate scale (P, C), and their error
        (float32: the codes are exact integers; the decoder's sums are its own)."""
        scales = _scales()[candidates].astype(np.float32)
        inverse = 1 / scales
        rebuilt = np.zeros(scales.shape, dtype=np.float32)
        error = np.zeros(scales.shape, dtype=np.float32)
        codes = np.empty((self.k - 1, *scales.shape), dtype=np.uint8)
        x, top = x.astype(np.float32), top.astype(np.float32)[:, None]
        for i, bits in enumerate(self.gap_bits):
            levels = _levels(int(bits)).astype(np.float32)
            target = x[:, i, None]
            ratio = (target - rebuilt) * inverse
            if int(bits) in _LEVEL_TABLE:  # spread levels: count the midpoints passed
                q = np.zeros(ratio.shape, dtype=np.uint8)
                for mid in (levels[1:] + levels[:-1]) / 2:
                    q += ratio > mid
            else:
                q = np.clip(np.rint(ratio), 0, len(levels) - 1).astype(np.uint8)
            rebuilt += levels[q] * scales
            # weighted by the larger of the true and the rebuilt probability: a rank rebuilt too likely
            # costs as much as one rebuilt too unlikely
            error += np.exp(top - np.minimum(rebuilt, target)) * np.square(rebuilt - target)
            codes[i] = q
        return error, codes

    def decode(self, records: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(P, record_bytes) uint8 → log-probs (P, k) float32 descending, ids (P, k) int64, tail (P,) float32
        (None without a tail)."""
        parts = _unpack_bits(records, self.fields)
        ids, top = parts[0], parts[1][:, 0].astype(np.uint16).view(np.float16).astype(np.float32)
        at = 2
        tail = None
        if self.tail:
            tail = parts[2][:, 0].astype(np.uint16).view(np.float16).astype(np.float32)
            at = 3
        scale = _scales().astype(np.float32)[parts[at][:, 0]]
        gaps = np.concatenate(parts[at + 1 :], axis=1) if self.k > 1 else None
        values = np.empty((len(records), self.k), dtype=np.float32)
        values[:, 0] = top
        if gaps is not None:
            multiples = self.level_table[np.arange(self.k - 1), gaps]  # (P, k−1)
            values[:, 1:] = top[:, None] - np.cumsum(multiples, axis=1) * scale[:, None]
        return values, ids, tail


_LEVEL_TABLE = {1: [0.0, 2.0], 2: [0.0, 1.0, 3.0, 8.0]}


def _levels(bits: int) -> np.ndarray:
    """The gap multiples a code of ``bits`` bits stands for: 4 bits and more uniform, 1–2 bits spread so a
    jump down the ranking is caught up within a few ranks."""
    return np.asarray(_LEVEL_TABLE.get(bits, range(1 << bits)), dtype=np.float64)


def _scales() -> np.ndarray:
    return 2.0 ** ((np.arange(1 << SCALE_BITS) - 48) / 4)


def id_bits(vocab_size: int) -> int:
    """⌈log₂ V⌉ (at least 1)."""
    return max(1, int(vocab_size - 1).bit_length())


def _pack_bits(values: list[np.ndarray], layout: list[tuple[int, int]], nbytes: int) -> np.ndarray:
    """Fields ((P, n) unsigned ints of ``bits`` bits each) → (P, nbytes) uint8, little-endian bit order.
    Leading 8/16/32-bit fields (the ids, l₀ and the tail at 16-bit ids) are copied as bytes, the rest go
    through a bit matrix."""
    out = np.zeros((len(values[0]), nbytes), dtype=np.uint8)
    offset, first = 0, 0
    for array, (count, width) in zip(values, layout, strict=True):
        if width not in (8, 16, 32):
            break
        raw = np.ascontiguousarray(np.asarray(array).astype(f"<u{width // 8}")).view(np.uint8)
        out[:, offset // 8 : (offset + count * width) // 8] = raw.reshape(len(out), -1)
        offset, first = offset + count * width, first + 1
    planes = []
    for array, (_count, width) in zip(values[first:], layout[first:], strict=True):
        array = np.asarray(array, dtype=np.uint32)
        shifts = np.arange(width, dtype=np.uint32)
        planes.append(((array[:, :, None] >> shifts) & 1).astype(np.uint8).reshape(len(array), -1))
    if planes:
        packed = np.packbits(np.concatenate(planes, axis=1), axis=1, bitorder="little")
        out[:, offset // 8 : offset // 8 + packed.shape[1]] = packed
    return out


def _unpack_bits(records: np.ndarray, layout: list[tuple[int, int]]) -> list[np.ndarray]:
    """The inverse of :func:`_pack_bits`: one (P, n) int64 array per field. Byte-aligned 8/16/32-bit fields
    are read as integers, the rest through a bit matrix of the bytes from the first of them on."""
    records = np.ascontiguousarray(records)
    out: list[np.ndarray] = []
    bits: np.ndarray | None = None
    offset, base = 0, 0
    for count, width in layout:
        if bits is None and offset % 8 == 0 and width in (8, 16, 32):
            chunk = records[:, offset // 8 : (offset + count * width) // 8]
            out.append(np.ascontiguousarray(chunk).view(f"<u{width // 8}").astype(np.int64))
        else:
            if bits is None:
                base = offset // 8 * 8
                bits = np.unpackbits(records[:, offset // 8 :], axis=1, bitorder="little")
            plane = bits[:, offset - base : offset - base + count * width].reshape(len(records), count, width)
            if width == 1:
                out.append(plane[:, :, 0].astype(np.int64))
            else:
                out.append(
                    (plane.astype(np.float32) @ (2.0 ** np.arange(width, dtype=np.float32))).astype(np.int64)
                )
        offset += count * width
    return out


# --- writing ------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_store(
    folder: Path, tensors: Mapping[str, Tensor], *, vocab_size: int | None, shard_positions: int | None = None
) -> dict[str, Any]:
    """Write a format-1 style tensor set (``offsets``, ``logprobs``, ``indices``, optional ``tail_logmass``,
    ``target_logprob``, ``prefix_end``) as a format-2 store into ``folder`` (which must exist); returns the
    manifest fields that describe it. ``vocab_size`` None: the largest id + 1 decides the id width."""
    offsets = tensors["offsets"].numpy().astype(np.int64)
    logprobs, indices = tensors["logprobs"], tensors["indices"]
    k = int(logprobs.shape[1]) if logprobs.ndim == 2 else 0
    vocab = int(vocab_size) if vocab_size else int(indices.max()) + 1 if indices.numel() else 1
    codec = Codec(k, id_bits(vocab), tail="tail_logmass" in tensors)
    side = [name for name in _SIDE if name in tensors]
    per_shard = shard_positions or SHARD_POSITIONS
    (folder / OFFSETS_FILE).write_bytes(offsets.tobytes())
    n_rows = len(offsets) - 1
    bounds = [0]  # whole rows, about ``per_shard`` positions a shard (at least one row)
    while bounds[-1] < n_rows:
        end = int(np.searchsorted(offsets, offsets[bounds[-1]] + per_shard, side="right")) - 1
        bounds.append(min(max(end, bounds[-1] + 1), n_rows))
    shards = []
    for row, end in zip(bounds, bounds[1:] or [0], strict=False):
        start, stop = int(offsets[row]), int(offsets[end])
        name = f"shard-{len(shards):05d}.bin"
        tail = tensors["tail_logmass"][start:stop].float().numpy() if codec.tail else None
        with (folder / name).open("wb") as f:
            f.write(codec.encode(logprobs[start:stop].float().numpy(), indices[start:stop].numpy(), tail))
            for field in side:
                f.write(tensors[field][start:stop].numpy().astype(_SIDE[field]).tobytes())
        size, digest = (folder / name).stat().st_size, _sha256(folder / name)
        shards.append(
            {"file": name, "rows": [row, end], "positions": [start, stop], "bytes": size, "sha256": digest}
        )
    index = {
        "format": FORMAT,
        "codec": CODEC,
        "k": k,
        "vocab_size": vocab,
        "id_bits": codec.id_bits,
        "tail": codec.tail,
        "record_bytes": codec.record_bytes,
        "side": side,
        "rows": n_rows,
        "positions": int(offsets[-1]),
        "offsets": {"file": OFFSETS_FILE, "sha256": _sha256(folder / OFFSETS_FILE)},
        "shards": shards,
    }
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=1))
    return manifest_fields(folder, index)


def manifest_fields(folder: Path, index: dict[str, Any]) -> dict[str, Any]:
    """The manifest keys of a format-2 entry: format, k, vocab_size, positions, bytes (the store's files:
    records, side data, offsets and index) and bytes_per_token (bytes / positions), plus the records' own
    bytes per token."""
    size = sum(s["bytes"] for s in index["shards"]) + (folder / OFFSETS_FILE).stat().st_size
    size += (folder / INDEX_FILE).stat().st_size
    positions = index["positions"]
    return {
        "format": FORMAT,
        "k": index["k"],
        "vocab_size": index["vocab_size"],
        "positions": positions,
        "bytes": size,
        "bytes_per_token": size / positions if positions else None,
        "bytes_per_token_topk": index["record_bytes"],
        "codec": index["codec"],
    }


# --- reading ------------------------------------------------------------------------------------------------


class TopkStore:
    """A format-2 entry opened for reading: nothing is read until a batch asks for positions, and then only
    the shards holding them (each mapped, and its sha256 checked once per process, when first opened)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.index = json.loads((self.folder / INDEX_FILE).read_text())
        if self.index.get("codec") != CODEC:
            raise StoreError(
                f"The teacher-output cache entry {self.folder.name} uses the codec "
                f"'{self.index.get('codec')}', which this version cannot read (it reads '{CODEC}')."
            )
        self.codec = Codec(self.index["k"], self.index["id_bits"], tail=self.index["tail"])
        offsets = self._verified(self.folder / OFFSETS_FILE, self.index["offsets"]["sha256"])
        self.offsets = torch.from_numpy(np.fromfile(offsets, dtype=np.int64))
        self.starts = np.asarray([s["positions"][0] for s in self.index["shards"]], dtype=np.int64)
        self._maps: dict[int, dict[str, np.ndarray]] = {}
        self._lock = threading.Lock()

    @property
    def opened(self) -> set[int]:
        """The shards this reader has mapped so far."""
        return set(self._maps)

    def _verified(self, path: Path, sha256: str) -> Path:
        stat = path.stat()
        memo = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        with _verified_lock:
            if memo in _verified:
                return path
        if _sha256(path) != sha256:
            raise StoreError(
                f"The teacher-output cache entry {self.folder.name} is damaged: {path.name} does not match "
                "its checksum. Delete the entry (it is computed again by the next run that needs it)."
            )
        with _verified_lock:
            _verified.add(memo)
        return path

    def _shard(self, i: int) -> dict[str, np.ndarray]:
        with self._lock:
            if i not in self._maps:
                meta = self.index["shards"][i]
                path = self._verified(self.folder / meta["file"], meta["sha256"])
                n = meta["positions"][1] - meta["positions"][0]
                views: dict[str, np.ndarray] = {}
                if n:
                    data = np.memmap(path, dtype=np.uint8, mode="r")
                    size = n * self.codec.record_bytes
                    views["records"] = data[:size].reshape(n, self.codec.record_bytes)
                    for name in self.index["side"]:
                        width = np.dtype(_SIDE[name]).itemsize * n
                        views[name] = data[size : size + width].view(_SIDE[name])
                        size += width
                self._maps[i] = views
            return self._maps[i]

    def _by_shard(
        self, positions: np.ndarray
    ) -> Iterator[tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]]:
        """(where in ``positions``, shard-local positions, the shard's views) for each shard involved."""
        shard = np.searchsorted(self.starts, positions, side="right") - 1
        for i in np.unique(shard):
            where = np.nonzero(shard == i)[0]
            yield where, positions[where] - self.starts[i], self._shard(int(i))

    def read(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Decoded log-probs (n, k) float32, ids (n, k) int64, tail (n,) float32 of flat ``positions``."""
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        k = self.codec.k
        values = np.empty((len(positions), k), dtype=np.float32)
        ids = np.empty((len(positions), k), dtype=np.int64)
        tail = np.empty(len(positions), dtype=np.float32) if self.codec.tail else None
        for where, local, views in self._by_shard(positions):
            v, i, t = self.codec.decode(views["records"][local])
            values[where], ids[where] = v, i
            if tail is not None:
                tail[where] = t
        return values, ids, tail

    def read_side(self, name: str, positions: np.ndarray) -> np.ndarray:
        """A side field (``target_logprob``, ``prefix_end``) at flat ``positions``."""
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        out = np.empty(len(positions), dtype=_SIDE[name])
        for where, local, views in self._by_shard(positions):
            out[where] = views[name][local]
        return out

    def read_all(self) -> dict[str, Tensor]:
        """The whole entry decoded, laid out as format 1 lays it out (ids int32, values float32): for tools
        and tests that compare entries; a run reads by rows."""
        positions = np.arange(self.index["positions"])
        values, ids, tail = self.read(positions)
        out = {"offsets": self.offsets, "logprobs": torch.from_numpy(values)}
        out["indices"] = torch.from_numpy(ids.astype(np.int32))
        if tail is not None:
            out["tail_logmass"] = torch.from_numpy(tail)
        return out | {name: torch.from_numpy(self.read_side(name, positions)) for name in self.index["side"]}

    @property
    def tensors(self) -> StoreTensors:
        return StoreTensors(self)


class StoreTensors(Mapping[str, Tensor]):
    """A format-2 entry's row data seen as a mapping of tensors: ``offsets`` and the side fields
    (``target_logprob``, ``prefix_end``: each read whole on access, for tools that want every row). The top-k
    itself is read by rows through :func:`.cache.gather_topk`, never whole."""

    def __init__(self, store: TopkStore) -> None:
        self.store = store

    def _names(self) -> list[str]:
        return ["offsets", *self.store.index["side"]]

    def __getitem__(self, name: str) -> Tensor:
        if name == "offsets":
            return self.store.offsets
        if name not in self.store.index["side"]:
            raise KeyError(name)
        return torch.from_numpy(self.store.read_side(name, np.arange(self.store.index["positions"])))

    def __contains__(self, name: object) -> bool:  # without reading the field
        return name in self._names()

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())


# --- converting format 1 ------------------------------------------------------------------------------------


def is_lm_topk(tensors: Mapping[str, Any]) -> bool:
    return "logprobs" in tensors and "indices" in tensors and "offsets" in tensors


def convert_entry(folder: Path, *, outputs_file: str, manifest_file: str) -> dict[str, Any] | None:
    """Rewrite a format-1 LM top-k entry in ``folder`` as format 2, in place; None when it is not one.

    The store's files are written first (a temporary folder moved in file by file), then ``index.json``,
    then the manifest (replaced atomically), and only then is ``outputs.safetensors`` removed: a reader sees
    either the old entry whole or the new one whole (a reader that had loaded the old file keeps it)."""
    from safetensors.torch import load_file

    outputs = folder / outputs_file
    if (folder / INDEX_FILE).is_file() or not outputs.is_file():
        return None
    tensors = load_file(outputs)
    if not is_lm_topk(tensors):
        return None
    manifest = json.loads((folder / manifest_file).read_text())
    vocab = ((manifest.get("teacher_dims") or {}).get("vocab_size")) or None
    tmp = folder / f".convert-{os.getpid()}-{threading.get_ident()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fields = write_store(tmp, tensors, vocab_size=vocab)
        for file in sorted(tmp.iterdir(), key=lambda p: p.name == INDEX_FILE):  # the index last
            os.replace(file, folder / file.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    fields = manifest_fields(folder, json.loads((folder / INDEX_FILE).read_text()))
    manifest.update(fields, converted_from_format=manifest.get("format", 1))
    staged = folder / f".{manifest_file}.{os.getpid()}.tmp"
    staged.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(staged, folder / manifest_file)
    outputs.unlink()
    return fields


def as_stored(records: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
    """Per-row (or whole-entry) top-k records as a format-2 entry gives them back (decode ∘ encode, one call
    for all of them), so a run trains on the same values before and after its entry is written. Anything
    else (classification logits, embeddings, ``DISTILLWEB_TOPK_STORE=float32``) is returned unchanged."""
    if not records or not is_lm_topk({"offsets": None, **records[0]}) or store_mode() != "compact":
        return records
    k = records[0]["logprobs"].shape[-1]
    tail = "tail_logmass" in records[0]
    lengths = [len(r["logprobs"]) for r in records]
    values, ids, tails = Codec(k, 32, tail=tail).decode(
        Codec(k, 32, tail=tail).encode(
            torch.cat([r["logprobs"] for r in records]).float().numpy(),
            torch.cat([r["indices"] for r in records]).numpy(),
            torch.cat([r["tail_logmass"] for r in records]).float().numpy() if tail else None,
        )
    )
    out, start = [], 0
    for record, n in zip(records, lengths, strict=True):
        new = dict(
            record,
            logprobs=torch.from_numpy(values[start : start + n]),
            indices=torch.from_numpy(ids[start : start + n]).to(record["indices"].dtype),  # ties reordered
        )
        if tail:
            new["tail_logmass"] = torch.from_numpy(tails[start : start + n])
        out.append(new)
        start += n
    return out
