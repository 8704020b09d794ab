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
