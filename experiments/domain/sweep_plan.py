"""What a sweep spans once parsed: the grid of its points, the runs an experiment will have (counted before
launch with the planner's rule: every training-setting point applies to every run, the hard-label baseline
included; a term sweep multiplies only the runs of recipes that have that term), and the labels of swept
values.

Pure: no database."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from experiments.domain import sweeps


def grid_size(axes: Mapping[str, Sequence[Any]]) -> int:
    """How many points the axes span (1 when nothing is swept)."""
    return math.prod(len(values) for values in axes.values())


def grid_points(axes: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of the axes' values, the first axis varying slowest; ``[{}]`` when nothing is swept.

    Callers check :func:`grid_size` against the run limit first.
    """
    keys = list(axes)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(axes[k] for k in keys))]


def train_axes(train: Mapping[str, Any]) -> dict[str, list[Any]]:
    """The swept training settings of an experiment's ``train`` (those stored as lists)."""
    return {key: list(value) for key, value in train.items() if isinstance(value, list)}


def chain_length(scheme: str, scheme_params: Mapping[str, Any] | None) -> int:
    """Runs one (student, seed, point) of a recipe creates: chained schemes train several models in a row."""
    if scheme == "teacher_assistant":
        return 2
    if scheme == "self_distillation":
        return int((scheme_params or {}).get("generations", 2))
    return 1


@dataclass(frozen=True)
class RecipeCount:
    """A recipe's share of the grid: its runs per (student, seed, training-setting point)."""

    label: str
    chain: int
    term_points: int

    @property
    def runs(self) -> int:
        return self.chain * self.term_points


@dataclass(frozen=True)
class RunCount:
    """How many runs an experiment creates, and from what."""

    students: int
    seeds: int
    train_points: int
    recipes: tuple[RecipeCount, ...]
    baseline: bool
    swept: tuple[str, ...] = field(default_factory=tuple)

    @property
    def per_point(self) -> int:
        """Runs per (student, seed, training-setting point)."""
        return sum(r.runs for r in self.recipes) + (1 if self.baseline else 0)

    @property
    def total(self) -> int:
        return self.students * self.seeds * self.train_points * self.per_point

    @property
    def baselines(self) -> int:
        return self.students * self.seeds * self.train_points if self.baseline else 0

    def describe(self) -> str:
        """E.g. "2 students × 2 seeds × 3 training settings × (kd-t4 × 3 term values + baseline)"."""

        def plural(n: int, word: str) -> str:
            return f"{n} {word}{'' if n == 1 else 's'}"

        parts = [plural(self.students, "student"), plural(self.seeds, "seed")]
        if self.train_points > 1:
            parts.append(plural(self.train_points, "training setting"))
        inner = []
        for recipe in self.recipes:
            text = recipe.label
            if recipe.term_points > 1:
                text += f" × {recipe.term_points} term values"
            if recipe.chain > 1:
                text += f" × {recipe.chain} chained runs"
            inner.append(text)
        if self.baseline:
            inner.append("baseline")
        return " × ".join(parts) + " × (" + " + ".join(inner) + ")"


def count_runs(
    *,
    students: int,
    seeds: int,
    train: Mapping[str, Any],
    recipes: Sequence[Any],
    term_sweeps: Mapping[str, Sequence[sweeps.Value]],
    with_baseline: bool,
) -> RunCount:
    """The size of an experiment, computed without building it.

    ``recipes`` are Recipe records (or anything with ``scheme``, ``scheme_params``, ``terms`` and a ``str``);
    hard-label recipes are the baseline, as in ``services.experiment_plan``.
    """
    chosen = [r for r in recipes if r.scheme != "hard_labels"]
    counts = tuple(
        RecipeCount(
            str(r),
            chain_length(r.scheme, r.scheme_params),
            grid_size(sweeps.recipe_axes((t.get("name") for t in r.terms), term_sweeps)),
        )
        for r in chosen
    )
    axes = train_axes(train)
    swept = (*axes, *term_sweeps)
    return RunCount(students, seeds, grid_size(axes), counts, with_baseline, tuple(swept))


def format_values(values: Sequence[sweeps.Value]) -> str:
    """Values as a field shows them again (exact, so a clone creates the same runs): ``"0.0001, 0.0003"``."""
    return ", ".join(sweeps.exact(v) for v in values)


def axis_label(axis: str, swept: Sequence[str]) -> str:
    """A short name for a swept axis: ``lr``; ``τ`` for ``kd.temperature`` unless another term's temperature
    is swept too (then ``kd.τ``); ``w_kd`` for a term weight."""
    if "." not in axis:
        return axis
    term, param = sweeps.term_axis(axis)
    if param == "weight":
        return f"w_{term}"
    symbol = sweeps.SYMBOLS.get(param, param)
    shared = [a for a in swept if "." in a and sweeps.term_axis(a)[1] == param]
    return symbol if len(shared) <= 1 else f"{term}.{symbol}"


def config_value(config: Mapping[str, Any], axis: str) -> sweeps.Value | None:
    """The concrete value of a swept axis in a run's frozen config (None when the run does not have it)."""
    if "." not in axis:
        if axis == "labelled_fraction":
            return (config.get("dataset") or {}).get(axis)
        return (config.get("train") or {}).get(axis)
    term, param = sweeps.term_axis(axis)
    for t in config.get("terms") or ():
        if t.get("name") == term:
            return t.get("weight") if param == "weight" else (t.get("params") or {}).get(param)
    return None


def experiment_axes(train: Mapping[str, Any]) -> list[str]:
    """The names of an experiment's swept axes, as stored in ``Experiment.train``: training settings held as
    lists, and ``term_sweeps``."""
    return [*train_axes(train), *(train.get("term_sweeps") or {})]


def run_label(*, train: Mapping[str, Any], config: Mapping[str, Any]) -> str:
    """The swept values of one run, e.g. ``"lr=3e-4 τ=4"`` (empty when its experiment sweeps nothing)."""
    axes = experiment_axes(train)
    parts = []
    for axis in axes:
        value = config_value(config, axis)
        if value is not None:
            parts.append(f"{axis_label(axis, axes)}={sweeps.format_number(value)}")
    return " ".join(parts)
