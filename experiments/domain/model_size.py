"""A model's parameter count for pages and estimates, where its record does not hold one.

A registered model keeps the count its source reported (``ModelSpec.param_count``: a prepared hub model, a
model trained here). The others are computed without loading anything:

- a builtin MLP from its layer sizes by the engine's own formula (``model_files.builtin_shape``). Its input
  layer is as wide as the dataset's features, so the count depends on the data: builtin nets read the packaged
  tabular sets only, whose widths are below. With a dataset given the count is exact; without one it is the
  count for each packaged set with the model's number of classes (one value, or a range when several fit);
- a model built from a transformers config by the standard formula (``memory.count_transformer_params``).

Anything else (a hub model not prepared on this site, a derived model before its first run) has no count.
"""

from __future__ import annotations

from dataclasses import dataclass

from experiments.models import DatasetSpec, ModelSpec
from workers.engine.memory import count_transformer_params
from workers.engine.model_files import builtin_shape

# Feature columns of the packaged tabular datasets (workers/engine/data.py reads them from scikit-learn).
PACKAGED_FEATURE_WIDTHS: dict[str, int] = {"digits": 64, "iris": 4, "wine": 13, "breast_cancer": 30}
# Their classes, as the engine loads them (experiments/domain/specs.py: BUILTIN_DATASETS).
PACKAGED_CLASSES: dict[str, int] = {"digits": 10, "iris": 3, "wine": 3, "breast_cancer": 2}


@dataclass(frozen=True)
class ModelSize:
    """A parameter count, or the range it spans over the datasets a builtin net can read; ``how`` says where
    it comes from (a page's tooltip)."""

    low: int
    high: int
    how: str

    @property
    def exact(self) -> bool:
        return self.low == self.high


def short_count(n: int) -> str:
    """``4930`` → "4.93k", ``22_700_000`` → "22.7M" (the ``compact`` filter's form)."""
    for limit, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= limit:
            return f"{n / limit:.3g}{suffix}" if n / limit < 100 else f"{n / limit:.0f}{suffix}"
    return str(n)


def size_text(size: ModelSize | None) -> str:
    """"4.93k", "1.01k–1.83k", or "—"."""
    if size is None:
        return "—"
    return short_count(size.low) if size.exact else f"{short_count(size.low)}–{short_count(size.high)}"


def mlp_params(hidden_sizes: list[int], *, input_width: int, num_labels: int) -> int:
    """Weights and biases of ``[Linear → ReLU → Dropout] × len(hidden_sizes) → Linear``."""
    shape = builtin_shape({"hidden_sizes": hidden_sizes}, input_width=input_width, num_labels=num_labels)
    return shape.params


def _mlp_size(spec: ModelSpec, dataset: DatasetSpec | None) -> ModelSize | None:
    sizes = (spec.config or {}).get("hidden_sizes", [256]) if isinstance(spec.config, dict) else [256]
    if dataset is not None:
        width = PACKAGED_FEATURE_WIDTHS.get(dataset.builtin_name) \
            if dataset.source == DatasetSpec.Source.BUILTIN else None
        if width is None:
            return None
        n = mlp_params(sizes, input_width=width, num_labels=spec.num_labels)
        return ModelSize(n, n, f"{n:,} on {dataset} ({width} features, {spec.num_labels} classes).")
    fits = {name: mlp_params(sizes, input_width=PACKAGED_FEATURE_WIDTHS[name], num_labels=spec.num_labels)
            for name, classes in PACKAGED_CLASSES.items() if classes == spec.num_labels}
    if not fits:
        return None
    counts = sorted(fits.values())
    per_set = "; ".join(f"{n:,} on {name} ({PACKAGED_FEATURE_WIDTHS[name]} features)"
                        for name, n in sorted(fits.items(), key=lambda item: item[1]))
    return ModelSize(counts[0], counts[-1], f"From the layer sizes and the data's feature count: {per_set}.")


def model_size(spec: ModelSpec, *, dataset: DatasetSpec | None = None) -> ModelSize | None:
    """The parameter count of ``spec`` (on ``dataset`` where it depends on the data), or None when unknown."""
    if spec.param_count:
        return ModelSize(spec.param_count, spec.param_count, f"{spec.param_count:,} (recorded).")
    if spec.source == ModelSpec.Source.BUILTIN and spec.builtin_arch == "mlp":
        return _mlp_size(spec, dataset)
    if spec.source == ModelSpec.Source.CONFIG and isinstance(spec.config, dict):
        n = count_transformer_params(spec.config, task=spec.task, num_labels=spec.num_labels)
        if n:
            return ModelSize(n, n, f"{n:,}, computed from its transformers config.")
    return None
