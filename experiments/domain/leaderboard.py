"""Leaderboard maths, with no database: spreads, the Pareto frontier, budgets and ranking of rows the
selectors built (``experiments.selectors.leaderboard``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol, TypeVar


class BoardRow(Protocol):
    """What ranking needs of a leaderboard row (``experiments.selectors.leaderboard.LeaderboardRow``)."""

    params: int | None
    latency_ms: float | None
    recipe: Any
    rank: int
    pareto: bool

    @property
    def family(self) -> str: ...

    @property
    def mean(self) -> float: ...


Row = TypeVar("Row", bound=BoardRow)


def sample_std(values: Sequence[float]) -> float:
    """The sample standard deviation (n - 1), 0 for fewer than two values. Float arithmetic:
    ``statistics.stdev`` is exact but builds fractions, which a leaderboard of thousands of rows cannot
    afford."""
    if len(values) < 2:
        return 0.0
    mean = math.fsum(values) / len(values)
    return math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))


def pareto_flags(
    points: Sequence[tuple[float | None, float | None]], *, higher_is_better: bool
) -> list[bool]:
    """Which (cost, quality) points are Pareto-optimal: no other point costs at most as much and scores at
    least as well, better in one of the two. Points with an unknown cost or quality are never optimal; equal
    points are optimal together. O(n log n).
    """
    sign = 1.0 if higher_is_better else -1.0
    known = sorted(
        ((cost, sign * quality, i) for i, (cost, quality) in enumerate(points)
         if cost is not None and quality is not None and math.isfinite(cost) and math.isfinite(quality)),
        key=lambda t: (t[0], -t[1]),
    )
    flags = [False] * len(points)
    best_cheaper = -math.inf  # the best (oriented) quality among strictly cheaper points
    i = 0
    while i < len(known):
        cost = known[i][0]
        group_best = known[i][1]  # sorted best-first within one cost
        j = i
        while j < len(known) and known[j][0] == cost:
            if known[j][1] == group_best and group_best > best_cheaper:
                flags[known[j][2]] = True
            j += 1
        best_cheaper = max(best_cheaper, group_best)
        i = j
    return flags


def leaderboard_filter(rows: Sequence[Row], *, higher_is_better: bool, max_params: int | None = None,
                       max_latency_ms: float | None = None, recipe: str = "",
                       family: str = "") -> list[Row]:
    """The rows that fit a size / latency budget (an unknown size or latency does not fit), a recipe name and
    a student family, ranked again among themselves and flagged ``pareto`` when no other kept row is at least
    as small and as good (quality vs parameters)."""
    kept = [
        r for r in rows
        if (max_params is None or (r.params is not None and r.params <= max_params))
        and (max_latency_ms is None or (r.latency_ms is not None and r.latency_ms <= max_latency_ms))
        and (not recipe or r.recipe.name == recipe)
        and (not family or r.family == family)
    ]
    flags = pareto_flags([(r.params, r.mean) for r in kept], higher_is_better=higher_is_better)
    for rank, (row, flag) in enumerate(zip(kept, flags, strict=True), 1):
        row.rank = rank
        row.pareto = flag
    return kept
