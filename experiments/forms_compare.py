"""Query forms of the compare page and the leaderboard. They only validate the GET parameters; the options a
select offers (metric names, eval splits, recipes, families) come from the data, so those fields are free text
here and an unknown value falls back to the default in the selectors."""

from __future__ import annotations

from typing import Any

from django import forms

from experiments.domain import input_rules
from experiments.forms import LeaderboardFilterForm

MAX_COMPARE_RUNS = 50
QUERY = input_rules.LEADERBOARD_QUERY


class RunIdsField(forms.Field):
    """Run ids from ``?runs=1,2,3`` and/or repeated ``?runs=1&runs=2`` (what a plain checkbox form sends):
    positive integers, duplicates dropped, order kept, at most ``max_runs``."""

    widget = forms.MultipleHiddenInput

    def __init__(self, *, max_runs: int = MAX_COMPARE_RUNS, **kwargs: Any) -> None:
        self.max_runs = max_runs
        super().__init__(**kwargs)

    def to_python(self, value: Any) -> list[int]:
        if not value:
            return []
        parts = [
            p.strip()
            for chunk in (value if isinstance(value, list | tuple) else [value])
            for p in str(chunk).split(",")
            if p.strip()
        ]
        if len(parts) > 10 * self.max_runs:  # refuse before converting a huge list
            raise forms.ValidationError(
                f"Compare at most {self.max_runs} runs at a time ({len(parts)} were selected).",
                code="too_many",
            )
        ids: list[int] = []
        for part in parts:
            if not (part.isascii() and part.isdigit()) or len(part) > 18 or int(part) < 1:
                raise forms.ValidationError(f"{part[:30]!r} is not a run id.", code="invalid")
            if int(part) not in ids:
                ids.append(int(part))
        return ids

    def validate(self, value: list[int]) -> None:
        super().validate(value)
        if len(value) > self.max_runs:
            raise forms.ValidationError(
                f"Compare at most {self.max_runs} runs at a time ({len(value)} were selected): "
                "deselect some.",
                code="too_many",
            )


class CompareForm(forms.Form):
    """Which runs to compare, which logged metric to overlay and what the Pareto plot's cost axis is."""

    COST_CHOICES = [("params", "Parameters"), ("latency", "Latency (ms, batch 1)")]

    runs = RunIdsField(required=False)
    metric = forms.CharField(max_length=64, required=False, label="Curve")
    cost = forms.ChoiceField(choices=COST_CHOICES, required=False, label="Pareto cost axis")


class LeaderboardQueryForm(LeaderboardFilterForm):
    """The leaderboard's budget plus the benchmark (eval split, metric), scope and row filters."""

    SCOPE_CHOICES = input_rules.LEADERBOARD_SCOPES

    split = QUERY["split"].field(label="Eval split")
    metric = QUERY["metric"].field(label="Metric")
    scope = QUERY["scope"].field(label="View")
    recipe = QUERY["recipe"].field(label="Method")
    family = QUERY["family"].field(label="Student family")

    def filters(self) -> dict[str, Any]:
        """The valid parameters (an invalid one is left out, so the others still apply)."""
        if not self.is_bound:
            return {}
        self.is_valid()
        return {k: v for k, v in self.cleaned_data.items() if v not in (None, "")}
