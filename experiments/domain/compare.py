"""Comparison maths, with no database: frozen configs flattened and diffed, and the heatmap grid of a
two-parameter sweep (``experiments.selectors.compare.run_comparison`` reads the runs)."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


def flatten_config(config: Any, prefix: str = "") -> dict[str, str]:
    """A frozen run config as dotted keys → JSON text of the leaf values.

    Nested dicts become ``train.lr``; lists of dicts that all carry a distinct ``name`` (the loss terms) are
    keyed by it (``terms.kd.params.temperature``), other lists of dicts by index; lists of plain values
    (``hidden_sizes``) stay one leaf.
    """
    if isinstance(config, Mapping):
        if not config and prefix:
            return {prefix: "{}"}
        flat: dict[str, str] = {}
        for key, value in config.items():
            flat |= flatten_config(value, f"{prefix}.{key}" if prefix else str(key))
        return flat
    if isinstance(config, list) and config and all(isinstance(item, Mapping) for item in config):
        names = [item.get("name") for item in config]
        named = all(isinstance(n, str) and n for n in names) and len(set(names)) == len(names)
        flat = {}
        for i, item in enumerate(config):
            label = item["name"] if named else str(i)
            flat |= flatten_config(
                {k: v for k, v in item.items() if not (named and k == "name")} or {"name": label},
                f"{prefix}.{label}",
            )
        return flat
    return {prefix: json.dumps(config, sort_keys=True)}


MISSING = "—"


@dataclass(frozen=True)
class ConfigKey:
    """One flattened config key and its value in each compared run (MISSING where a run lacks it)."""

    key: str
    values: tuple[str, ...]

    @property
    def differs(self) -> bool:
        return len(set(self.values)) > 1


def config_diff(configs: Sequence[Mapping[str, Any]]) -> list[ConfigKey]:
    """Every key of the runs' flattened configs, sorted, with one value per run."""
    flat = [flatten_config(c) for c in configs]
    keys = sorted({k for f in flat for k in f})
    return [ConfigKey(k, tuple(f.get(k, MISSING) for f in flat)) for k in keys]


SWEEP_IGNORED = frozenset({"train.seed"})


@dataclass(frozen=True)
class SweepGrid:
    """The runs as a full grid over two parameters: ``z[i][j]`` is the mean metric of the runs (seeds) at
    ``y_levels[i]``, ``x_levels[j]`` (None when none of them has a value)."""

    x_key: str
    y_key: str
    x_levels: list[str]
    y_levels: list[str]
    z: list[list[float | None]]
    x_keys: tuple[str, ...] = ()
    y_keys: tuple[str, ...] = ()


def _level_order(level: str) -> tuple[int, float, str]:
    try:
        number = json.loads(level)
    except ValueError:
        number = None
    if isinstance(number, int | float) and not isinstance(number, bool):
        return (0, float(number), level)
    return (1, 0.0, level)


def sweep_grid(configs: Sequence[Mapping[str, Any]], values: Sequence[float | None]) -> SweepGrid | None:
    """The heatmap of a two-parameter sweep, or None when the runs do not form one.

    Keys that vary together (a different student changes several keys at once) count as one parameter,
    labelled by its first key; the seed is averaged over. The runs form a grid when exactly two parameters
    vary, each with at least two values, and every combination of their values has a run.
    """
    if len(configs) != len(values):
        raise ValueError("one value per config")
    diff = [k for k in config_diff(configs) if k.differs and k.key not in SWEEP_IGNORED]
    by_partition: dict[tuple[int, ...], list[ConfigKey]] = {}
    for key in diff:
        first_seen: dict[str, int] = {}
        partition = tuple(first_seen.setdefault(v, len(first_seen)) for v in key.values)
        by_partition.setdefault(partition, []).append(key)
    if len(by_partition) != 2:
        return None
    (y_group, x_group) = sorted(by_partition.values(), key=lambda keys: keys[0].key)
    y, x = y_group[0], x_group[0]
    y_levels = sorted(set(y.values), key=_level_order)
    x_levels = sorted(set(x.values), key=_level_order)
    cells: dict[tuple[str, str], list[float]] = {}
    for yv, xv, value in zip(y.values, x.values, values, strict=True):
        bucket = cells.setdefault((yv, xv), [])
        if value is not None and math.isfinite(value):
            bucket.append(value)
    if len(x_levels) < 2 or len(y_levels) < 2 or len(cells) != len(x_levels) * len(y_levels):
        return None
    z = [
        [statistics.fmean(cells[(yv, xv)]) if cells[(yv, xv)] else None for xv in x_levels] for yv in y_levels
    ]
    return SweepGrid(x.key, y.key, x_levels, y_levels, z,
                     tuple(k.key for k in x_group), tuple(k.key for k in y_group))


# --- efficiency figures -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Latency:
    """A measured latency from an evaluation's metrics: the median with its spread (``low``–``high``: p25–p75;
    ``fastest``–``slowest``: the range of the repeats) and the setting it was measured in (see
    ``workers.engine.evaluate.efficiency_metrics``). Older evaluations recorded only a median: the spread is
    then None and the setting empty."""

    median: float
    low: float | None = None
    high: float | None = None
    fastest: float | None = None
    slowest: float | None = None
    device: str = ""
    threads: int | None = None
    batch: int | None = None
    seq_len: int | None = None
    shared_host: bool = False

    @property
    def has_spread(self) -> bool:
        return None not in (self.low, self.high, self.fastest, self.slowest)

    @property
    def on_cpu(self) -> bool:
        return self.device == "cpu"

    @property
    def mark(self) -> str:
        """"CPU, shared host" for figures measured on a shared CPU (compare them only with their spread)."""
        if self.on_cpu or self.shared_host:
            return "CPU, shared host" if self.shared_host else "CPU"
        return ""

    @property
    def setting(self) -> str:
        """The setting in words, e.g. "cpu · 1 thread · batch 1 · 128 tokens"; "" when not recorded."""
        if not self.device:
            return ""
        parts = [self.device]
        if self.threads is not None:
            parts.append(f"{self.threads} thread{'' if self.threads == 1 else 's'}")
        if self.batch is not None:
            parts.append(f"batch {self.batch}")
        if self.seq_len is not None:
            parts.append(f"{self.seq_len} tokens")
        if self.shared_host:
            parts.append("shared host")
        return " · ".join(parts)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def latency_of(metrics: Mapping[str, Any] | None, median: float | None = None) -> Latency | None:
    """The batch-1 latency recorded in an evaluation's ``metrics`` (``median`` overrides its
    ``latency_ms_p50``, e.g. the evaluation's own column); None when there is none."""
    metrics = metrics or {}
    median = _number(median) if median is not None else _number(metrics.get("latency_ms_p50"))
    if median is None or median <= 0:
        return None
    low, high = _number(metrics.get("latency_ms_p25")), _number(metrics.get("latency_ms_p75"))
    fastest, slowest = _number(metrics.get("latency_ms_min")), _number(metrics.get("latency_ms_max"))
    if None in (low, high, fastest, slowest) or not 0 < fastest <= low <= median <= high <= slowest:  # type: ignore[operator]
        low = high = fastest = slowest = None
    setting = metrics.get("efficiency_setting")
    setting = setting if isinstance(setting, Mapping) else {}

    def whole(key: str) -> int | None:
        value = _number(setting.get(key))
        return int(value) if value is not None else None

    return Latency(
        median, low, high, fastest, slowest,
        device=str(setting.get("device") or ""),
        threads=whole("threads"),
        batch=whole("batch"),
        seq_len=whole("seq_len"),
        shared_host=setting.get("shared_host") is True,
    )


@dataclass(frozen=True)
class Speedup:
    """Teacher latency / student latency: the ratio of the medians, and the interval from the two spreads
    (the teacher's fastest repeat over the student's slowest up to the teacher's slowest over the student's
    fastest). The range of the repeats, not p25–p75: two measurements of the same model minutes apart on a
    shared host differ by more than one measurement's interquartile range (its drift is a few per cent,
    the quartiles often within 2%), so a p25–p75 interval would exclude 1.0 for identical models."""

    value: float
    low: float
    high: float
    mark: str = ""
    """"CPU, shared host" when either side was measured on a shared CPU, else ""."""
    comparable: bool = True
    """False when the two sides were measured in different settings (device, threads or batch)."""

    def contains(self, ratio: float) -> bool:
        return self.low <= ratio <= self.high


def speedup(teacher: Latency | None, student: Latency | None) -> Speedup | None:
    """The student's speedup over the teacher with its interval; None unless both latencies carry a spread
    (a bare ratio of two single numbers is not shown)."""
    if teacher is None or student is None or not teacher.has_spread or not student.has_spread:
        return None
    assert teacher.fastest is not None and teacher.slowest is not None  # for the type checker
    assert student.fastest is not None and student.slowest is not None
    mark = teacher.mark or student.mark
    if teacher.shared_host or student.shared_host:
        mark = "CPU, shared host"
    comparable = (teacher.device, teacher.threads, teacher.batch) == (student.device, student.threads,
                                                                        student.batch)
    return Speedup(
        teacher.median / student.median,
        teacher.fastest / student.slowest,
        teacher.slowest / student.fastest,
        mark=mark,
        comparable=comparable,
    )
