"""Which runs differ only by their seed: the unit an overlay of many runs draws as one mean ± std band."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any


def _without_seed(config: Mapping[str, Any]) -> str:
    train = {k: v for k, v in (config.get("train") or {}).items() if k != "seed"}
    return json.dumps({**config, "train": train}, sort_keys=True, default=str)


def seed_groups(runs: Iterable[tuple[int, str, Mapping[str, Any]]]) -> dict[int, str]:
    """Run id → the name of its group, for ``(run id, label, frozen config)`` triples: runs whose configs
    are equal but for ``train.seed`` share a group, named by their label (e.g. ``"mlp-16 · kd"``); groups
    that would share a name get their first run's id as well (``"mlp-16 · kd · from #12"``)."""
    runs = list(runs)
    keys: dict[str, list[int]] = {}
    labels: dict[str, str] = {}
    for run_id, label, config in runs:
        key = f"{label}\0{_without_seed(config or {})}"
        keys.setdefault(key, []).append(run_id)
        labels[key] = label
    named: dict[str, int] = {}
    for key in keys:
        named[labels[key]] = named.get(labels[key], 0) + 1
    groups = {}
    for key, ids in keys.items():
        name = labels[key] if named[labels[key]] == 1 else f"{labels[key]} · from #{min(ids)}"
        groups |= {run_id: name for run_id in ids}
    return groups
