"""What changed between two versions of a recipe, in words a reader can scan: terms added or removed, a
term's weight, schedule or parameters, the scheme and its parameters, the description.

Pure: plain values in (a recipe's ``scheme``, ``scheme_params``, ``terms`` and ``description``), changes out.
Terms are matched by name, and by order among terms of the same name (a recipe may use a term twice, e.g. two
``hidden_mse`` terms with different layer maps).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

ADDED, REMOVED, CHANGED = "added", "removed", "changed"


@dataclass(frozen=True)
class Change:
    kind: str  # ADDED | REMOVED | CHANGED
    what: str  # "term kd", "kd.temperature", "kd weight", "scheme", "scheme.generations", "description"
    old: str = ""
    new: str = ""


def value_text(value: Any) -> str:
    """A parameter value as a reader writes it: ``4``, ``0.5``, ``true``, ``[2, 4]``, ``uniform``."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    if isinstance(value, int | float | str):
        return str(value)
    return json.dumps(value, sort_keys=True, separators=(", ", ": "))


def term_text(term: Mapping[str, Any]) -> str:
    """One term as the recipe's formula writes it: ``0.9·kd(temperature=4)``."""
    params = ", ".join(f"{k}={value_text(v)}" for k, v in sorted((term.get("params") or {}).items()))
    return f"{value_text(term.get('weight', 1.0))}·{term.get('name')}" + (f"({params})" if params else "")


def schedule_text(schedule: Mapping[str, Any] | None) -> str:
    if not schedule:
        return "constant"
    return f"{schedule.get('kind')} {value_text(schedule.get('start'))} → {value_text(schedule.get('end'))}"


def _keyed_terms(terms: Sequence[Mapping[str, Any]]) -> dict[tuple[str, int], Mapping[str, Any]]:
    seen: dict[str, int] = {}
    keyed = {}
    for term in terms:
        name = str(term.get("name"))
        seen[name] = seen.get(name, 0) + 1
        keyed[(name, seen[name])] = term
    return keyed


def _term_label(name: str, nth: int, keyed: Mapping[tuple[str, int], Any]) -> str:
    return f"{name} #{nth}" if nth > 1 or (name, 2) in keyed else name


def _mapping_changes(prefix: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Change]:
    changes = []
    for key in sorted(set(old) | set(new)):
        if key not in new:
            changes.append(Change(REMOVED, f"{prefix}.{key}", old=value_text(old[key])))
        elif key not in old:
            changes.append(Change(ADDED, f"{prefix}.{key}", new=value_text(new[key])))
        elif old[key] != new[key]:
            changes.append(Change(CHANGED, f"{prefix}.{key}", value_text(old[key]), value_text(new[key])))
    return changes


def _term_changes(label: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Change]:
    changes = []
    if old.get("weight", 1.0) != new.get("weight", 1.0):
        changes.append(
            Change(
                CHANGED,
                f"{label} weight",
                value_text(old.get("weight", 1.0)),
                value_text(new.get("weight", 1.0)),
            )
        )
    old_schedule = (old.get("schedule") or {}).get("weight")
    new_schedule = (new.get("schedule") or {}).get("weight")
    if old_schedule != new_schedule:
        changes.append(
            Change(
                CHANGED, f"{label} weight schedule", schedule_text(old_schedule), schedule_text(new_schedule)
            )
        )
    changes += _mapping_changes(label, old.get("params") or {}, new.get("params") or {})
    return changes


def recipe_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Change]:
    """The changes from recipe ``old`` to recipe ``new`` (each a mapping with ``scheme``, ``scheme_params``,
    ``terms`` and ``description``); empty when they are the same."""
    changes: list[Change] = []
    if old.get("scheme") != new.get("scheme"):
        changes.append(Change(CHANGED, "scheme", str(old.get("scheme")), str(new.get("scheme"))))
    changes += _mapping_changes("scheme", old.get("scheme_params") or {}, new.get("scheme_params") or {})
    old_terms, new_terms = _keyed_terms(old.get("terms") or []), _keyed_terms(new.get("terms") or [])
    for key, term in old_terms.items():
        if key not in new_terms:
            changes.append(Change(REMOVED, f"term {_term_label(*key, old_terms)}", old=term_text(term)))
    for key, term in new_terms.items():
        if key not in old_terms:
            changes.append(Change(ADDED, f"term {_term_label(*key, new_terms)}", new=term_text(term)))
        else:
            changes += _term_changes(_term_label(*key, new_terms), old_terms[key], term)
    if (old.get("description") or "") != (new.get("description") or ""):
        changes.append(
            Change(CHANGED, "description", old.get("description") or "—", new.get("description") or "—")
        )
    return changes
