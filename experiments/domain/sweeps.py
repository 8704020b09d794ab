"""Sweeps: several values for a training setting or a recipe term parameter, and the grid they span.

One field takes comma-separated items; an item is a number or a range ``START:STOP:SPEC``:

- ``logN``  — N values evenly spaced on a log scale, both ends included: ``1e-4:1e-3:log4`` → 1e-4, 2.15e-4,
  4.64e-4, 1e-3;
- ``linN``  — N evenly spaced values, both ends included: ``0.1:0.9:lin5`` → 0.1, 0.3, 0.5, 0.7, 0.9;
- ``stepS`` — START, START + S, … up to STOP: ``2:8:step2`` → 2, 4, 6, 8.

Items mix freely (``1e-4, 5e-4:1e-3:lin2``). A range is counted before it is expanded, so ``1:1e9:step1`` is
refused at once. Recipe term parameters are swept one per line, ``TERM.PARAM = VALUES``: ``kd.temperature =
2, 4, 8`` or ``kd.weight = 0.5:0.9:lin3`` (a term's weight is ``TERM.weight``); choice and true/false
parameters take lists (``topk.divergence = kd, jsd``).

This module is pure: no database. What the parsed sweeps span (the grid, the run count, labels) is in
:mod:`experiments.domain.sweep_plan`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Number = int | float


Value = int | float | str | bool


Item = int | float | str | bool  # one item of a swept list given as a value


SYNTAX_HELP = (
    'One value, a list "1e-4, 3e-4", or a range: "1e-4:1e-3:log4" (4 log-spaced values), '
    '"0.1:0.9:lin5" (5 evenly spaced), "2:8:step2" (2, 4, 6, 8).'
)


TERM_SWEEP_HELP = (
    'One per line, TERM.PARAM = values, e.g. "kd.temperature = 2, 4, 8" or "kd.weight = 0.5:0.9:lin3"; '
    "it applies to the chosen recipes that have that term."
)


# Each line of the term sweeps field, and the field itself, are bounded so that parsing stays cheap.
MAX_TERM_SWEEP_LINES = 20


_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"


_NUMBER_RE = re.compile(rf"^{_NUMBER}$")


_RANGE_RE = re.compile(
    rf"^(?P<start>{_NUMBER}):(?P<stop>{_NUMBER}):(?P<mode>log|lin|step)(?P<arg>{_NUMBER})$", re.IGNORECASE
)


_AXIS_RE = re.compile(r"^(?P<term>[a-z][a-z0-9_]*)\.(?P<param>[a-z][a-z0-9_]*)$")


# Floating-point noise in generated values (0.1 + 2 * 0.2 = 0.5000000000000001) is rounded away.
_LINEAR_DIGITS = 12


_LOG_DIGITS = 6


SYMBOLS = {"temperature": "τ", "alpha": "α", "beta": "β", "weight": "w"}


class SweepError(ValueError):
    """A sweep that cannot be read or is too large; its message is shown under the field."""


@dataclass(frozen=True)
class _Range:
    start: float
    stop: float
    mode: str
    arg: float
    text: str

    def count(self) -> int:
        if self.mode in ("log", "lin"):
            return int(self.arg)
        steps = (self.stop - self.start) / self.arg
        if not math.isfinite(steps) or steps > 1e15:
            return 10**16  # more than any limit: refused without expanding
        return math.floor(steps * (1 + 1e-12) + 1e-9) + 1

    def values(self) -> list[float]:
        n = self.count()
        if self.mode == "step":
            return [_round(self.start + i * self.arg, _LINEAR_DIGITS) for i in range(n)]
        if self.mode == "lin":
            width = (self.stop - self.start) / (n - 1)
            return [
                self.start,
                *(_round(self.start + i * width, _LINEAR_DIGITS) for i in range(1, n - 1)),
                self.stop,
            ]
        lo, hi = math.log10(self.start), math.log10(self.stop)
        inner = (_round(10 ** (lo + i * (hi - lo) / (n - 1)), _LOG_DIGITS) for i in range(1, n - 1))
        return [self.start, *inner, self.stop]


def _round(value: float, digits: int) -> float:
    return float(f"{value:.{digits}g}")


def _number(text: str, what: str) -> float:
    if not _NUMBER_RE.match(text):
        raise SweepError(f'"{_clip(text)}" is not {what}.')
    value = float(text)
    if not math.isfinite(value):
        raise SweepError(f'"{_clip(text)}" is too large.')
    return value


def _clip(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _items(text: str) -> list[str]:
    items = [part.strip() for part in text.split(",")]
    if any(not item for item in items):
        raise SweepError('Separate values with single commas, e.g. "1e-4, 3e-4".')
    return items


def _parse_item(item: str) -> float | _Range:
    compact = item.replace(" ", "")
    if ":" not in compact:
        return _number(compact, "a number")
    match = _RANGE_RE.match(compact)
    if match is None:
        raise SweepError(
            f'"{_clip(item)}" is not a range: write START:STOP:logN, START:STOP:linN or '
            f"START:STOP:stepS, e.g. 1e-4:1e-3:log4."
        )
    start, stop = _number(match["start"], "a number"), _number(match["stop"], "a number")
    mode, arg = match["mode"].lower(), _number(match["arg"], "a number")
    if start >= stop:
        raise SweepError(f'In "{_clip(item)}" the start must be smaller than the stop.')
    if mode in ("log", "lin"):
        if not arg.is_integer() or arg < 2:
            raise SweepError(
                f'In "{_clip(item)}" give how many values as a whole number of 2 or more (e.g. {mode}4).'
            )
        if mode == "log" and start <= 0:
            raise SweepError(f'A log range starts above 0: "{_clip(item)}".')
    elif arg <= 0:
        raise SweepError(f'In "{_clip(item)}" the step must be above 0.')
    return _Range(start, stop, mode, arg, item)


def _check_bounds(value: float, *, lo: float | None, hi: float | None, item: str) -> None:
    where = f' ("{_clip(item)}")' if ":" in item else ""
    if lo is not None and value < lo:
        raise SweepError(f"Ensure this value is greater than or equal to {lo:g}{where}.")
    if hi is not None and value > hi:
        raise SweepError(f"Ensure this value is less than or equal to {hi:g}{where}.")


def parse_values(
    text: str, *, kind: type = float, lo: float | None = None, hi: float | None = None, limit: int
) -> list[Number]:
    """The values of one swept field typed as text, in the order written.

    Args:
        text: e.g. ``"3e-4"``, ``"1e-4, 3e-4"``, ``"1e-4:1e-3:log4"``.
        kind: ``int`` (whole numbers; log and linear ranges are rounded) or ``float``.
        lo, hi: inclusive bounds every value must respect (checked on a range's ends before expanding it).
        limit: the most values accepted; counted before anything is expanded.
    Raises:
        SweepError: bad syntax, a value out of range or not whole, repeated values, or more than ``limit``.
    """
    text = text.strip()
    if not text:
        raise SweepError("Enter a value.")
    return _numbers(_items(text), kind=kind, lo=lo, hi=hi, limit=limit)


def value_list(
    values: Any, *, kind: type = float, lo: float | None = None, hi: float | None = None, limit: int
) -> list[Number]:
    """The values of one swept field given as a value (a JSON or YAML list, or one value): a number is itself,
    a text item one value or range (``"2e-4:1e-3:log3"``). The rules of :func:`parse_values` apply; a list is
    bounded by its number of items, each text item by ``ITEM_CAP`` characters."""
    return _numbers(list_items(values, choices=False, limit=limit), kind=kind, lo=lo, hi=hi, limit=limit)


def _numbers(
    items: Sequence[Item], *, kind: type, lo: float | None, hi: float | None, limit: int
) -> list[Number]:
    parsed = [_parse_any(item) for item in items]
    total = sum(p.count() if isinstance(p, _Range) else 1 for _, p in parsed)
    if total > limit:
        raise SweepError(f"This gives {total:,} values; at most {limit:,} fit in one experiment.")
    values: list[Number] = []
    for item, p in parsed:
        ends = (p.start, p.stop) if isinstance(p, _Range) else (p,)
        for end in ends:
            _check_bounds(end, lo=lo, hi=hi, item=item)
        if kind is int:
            values += _whole(item, p)
        else:
            values += p.values() if isinstance(p, _Range) else [p]
    seen: set[Number] = set()
    for value in values:
        if value in seen:
            raise SweepError(
                f"{format_number(value)} appears more than once"
                + (
                    "; rounded to whole numbers, this range repeats values: use fewer."
                    if kind is int
                    else "."
                )
            )
        seen.add(value)
    return values


def _parse_any(item: Item) -> tuple[str, float | _Range]:
    """(the item as shown in messages, its value or range): text is read, a number taken as it is."""
    if isinstance(item, str):
        return item, _parse_item(item)
    shown = exact(item)
    if isinstance(item, bool):
        return shown, _number(shown, "a number")
    try:
        value = float(item)
    except OverflowError:
        value = math.inf
    if not math.isfinite(value):
        raise SweepError(f'"{_clip(shown)}" is too large.')
    return shown, value


# A list is bounded by its number of items instead of a field's length (each text item by a cap of its own),
# so that an exported sweep of many values imports again.
ITEM_CAP = 200  # characters of one list item: what the field of one training setting takes


_ITEM_SHAPE = "Give one value or range per list item (no commas or line breaks inside an item)."


def list_items(values: Any, *, choices: bool, limit: int) -> list[Item]:
    """The items of a swept list (one value becomes a list of one): numbers, and text holding one value or
    range each (``choices``: true/false and names too, for term parameters)."""
    if not isinstance(values, list):
        values = [values]
    if not values:
        raise SweepError("Give at least one value.")
    if len(values) > limit:
        raise SweepError(f"This gives {len(values):,} values; at most {limit:,} fit in one experiment.")
    items: list[Item] = []
    for item in values:
        if isinstance(item, bool) and not choices:
            raise SweepError("Give numbers, not true/false.")
        if isinstance(item, str):
            item = item.strip()
            if len(item) > ITEM_CAP:
                raise SweepError(f"A list item may be at most {ITEM_CAP} characters.")
            if not item or any(c in item for c in ",\n\r"):
                raise SweepError(_ITEM_SHAPE)
        elif not isinstance(item, int | float):
            raise SweepError('Give a list of values: numbers, or ranges such as "1e-4:1e-3:log4".')
        items.append(item)
    return items


def _whole(item: str, parsed: float | _Range) -> list[int]:
    if not isinstance(parsed, _Range):
        if not parsed.is_integer():
            raise SweepError(f'"{_clip(item)}" is not a whole number.')
        return [int(parsed)]
    if parsed.mode == "step" and not (parsed.start.is_integer() and parsed.arg.is_integer()):
        raise SweepError(f'"{_clip(item)}": a range of whole numbers starts and steps by whole numbers.')
    return [round(v) for v in parsed.values()]


def parse_choices(text: str, *, choices: Sequence[str], limit: int) -> list[str]:
    """A list of choices (``"kd, jsd"``) for a parameter that takes one of ``choices``."""
    return _choices(_words(text), choices=choices, limit=limit)


def _words(text: str) -> list[str]:
    return [item.lower() for item in _items(text.strip())] if text.strip() else []


def _item_words(items: Sequence[Item]) -> list[str]:
    return [(item if isinstance(item, str) else exact(item)).lower() for item in items]


def _choices(items: list[str], *, choices: Sequence[str], limit: int) -> list[str]:
    if not items:
        raise SweepError("Enter a value.")
    if len(items) > limit:
        raise SweepError(f"This gives {len(items):,} values; at most {limit:,} fit in one experiment.")
    for item in items:
        if item not in choices:
            raise SweepError(f'"{_clip(item)}" is not one of: {", ".join(choices)}.')
    if len(set(items)) != len(items):
        raise SweepError("Each value may appear once.")
    return items


def parse_booleans(text: str) -> list[bool]:
    """``"true, false"`` → [True, False]."""
    return _booleans(_words(text))


def _booleans(items: list[str]) -> list[bool]:
    words = {"true": True, "false": False}
    if not items or any(item not in words for item in items):
        raise SweepError('Enter true, false, or "true, false".')
    if len(set(items)) != len(items):
        raise SweepError("Each value may appear once.")
    return [words[item] for item in items]


def parse_term_sweeps(text: str, *, limit: int) -> dict[str, list[Value]]:
    """``"kd.temperature = 2, 4\\nkd.weight = 0.5:0.9:lin3"`` → ``{"kd.temperature": [2.0, 4.0], ...}``.

    Each term and parameter is checked against the engine's schema (``workers.engine.terms.LOSS_TERMS``), and
    each value against the parameter's own rules. Blank lines and lines starting with ``#`` are skipped.

    Raises:
        SweepError: naming the line at fault.
    """
    return _term_axes([_line_row(line) for line in text.splitlines()], limit=limit)


_TermRow = tuple[str, "str | None", "str | list[Item]"]  # (the line shown in messages, TERM.PARAM, values)


def _line_row(line: str) -> _TermRow:
    name, sep, values = line.strip().partition("=")
    return line.strip(), (name if sep else None), values


_LINE = object()  # the axis of a term sweep given as a whole "TERM.PARAM = values" line


_TERM_SHAPE = (
    'Give term sweeps as {"TERM.PARAM": [values]}, or a list of "TERM.PARAM = values" lines or of '
    '{"param": "TERM.PARAM", "values": [values]}.'
)


def _term_sweep_entries(value: dict[str, Any] | list[Any]) -> list[tuple[Any, Any]]:
    """(axis, values) pairs of term sweeps given as a mapping or a list; a line given as text is (_LINE, line)
    (an axis given as "" or null is a mistake to report, not a line)."""
    if isinstance(value, dict):
        return list(value.items())
    entries: list[tuple[Any, Any]] = []
    for item in value:
        if isinstance(item, str):
            if "\n" in item or "\r" in item:
                raise SweepError("Give one TERM.PARAM = values line per list item.")
            entries.append((_LINE, item))
        elif isinstance(item, dict) and set(item) == {"param", "values"}:
            entries.append((item["param"], item["values"]))
        elif isinstance(item, dict) and item:
            entries.extend(item.items())
        else:
            raise SweepError(_TERM_SHAPE)
    return entries


def term_sweeps_value(value: dict[str, Any] | list[Any], *, cap: int, limit: int) -> dict[str, list[Value]]:
    """Term sweeps given as a value (JSON, YAML): a mapping ``{"kd.temperature": [2, 4]}``, or a list of
    ``"TERM.PARAM = values"`` lines or of ``{"param": "kd.temperature", "values": [2, 4]}``. A line, or values
    given as text, may be ``cap`` characters long; the rules of :func:`parse_term_sweeps` apply."""
    return _term_axes(term_sweep_rows(value, cap=cap, limit=limit), limit=limit)


def term_sweep_rows(value: dict[str, Any] | list[Any], *, cap: int, limit: int) -> list[_TermRow]:
    """The rows of term sweeps given as a value, their shape checked (each axis named, each list of values
    within its caps) but not yet their parameters or values."""
    rows: list[_TermRow] = []
    for axis, values in _term_sweep_entries(value):
        if isinstance(values, str) and len(values) > cap:
            raise SweepError(f"{'A line' if axis is _LINE else str(axis)[:40]}: at most {cap} characters.")
        if axis is _LINE:  # a line as written in the form
            rows.append(_line_row(values))
            continue
        if not isinstance(axis, str) or not axis.strip() or any(c in axis for c in "=\n\r"):
            raise SweepError(
                f"{str(axis)[:40]!r} does not name a term parameter; write TERM.PARAM, e.g. kd.temperature."
            )
        if isinstance(values, str):  # the values in the form's syntax: "2, 4" or "2:8:step2"
            if "\n" in values or "\r" in values:
                raise SweepError(f"{axis}: give the values on one line.")
            rows.append((f"{axis} = {values}".strip(), axis, values))
            continue
        try:
            items = list_items(values, choices=True, limit=limit)
        except SweepError as exc:
            raise SweepError(f"{axis}: {exc}") from None
        shown = ", ".join(item if isinstance(item, str) else exact(item) for item in items)
        rows.append((f"{axis} = {shown}".strip(), axis, items))
    return rows


def _term_axes(rows: list[_TermRow], *, limit: int) -> dict[str, list[Value]]:
    """The swept values of each ``TERM.PARAM`` row (blank rows and ``#`` comments skipped)."""
    from workers.engine.terms import LOSS_TERMS

    rows = [row for row in rows if row[0] and not row[0].startswith("#")]
    if len(rows) > MAX_TERM_SWEEP_LINES:
        raise SweepError(f"At most {MAX_TERM_SWEEP_LINES} swept parameters.")
    axes: dict[str, list[Value]] = {}
    for number, (line, name, values) in enumerate(rows, 1):
        where = f"Line {number} ({_clip(line, 30)})"
        axis = (name or "").strip().lower().replace(" ", "")
        match = _AXIS_RE.match(axis)
        if name is None or match is None:
            raise SweepError(f"{where}: write TERM.PARAM = values, e.g. kd.temperature = 2, 4, 8.")
        term, param = match["term"], match["param"]
        spec = LOSS_TERMS.get(term)
        if spec is None:
            raise SweepError(f"{where}: there is no loss term {term}; terms: {', '.join(LOSS_TERMS)}.")
        if axis in axes:
            raise SweepError(f"{where}: {axis} is swept twice.")
        try:
            axes[axis] = _term_values(term, param, spec, values, limit=limit)
        except SweepError as exc:
            raise SweepError(f"{where}: {exc}") from None
    return axes


def _term_values(term: str, param: str, spec: Any, values: str | list[Item], *, limit: int) -> list[Value]:
    """Read the values of ``term.param`` (text, or items of a list) by the parameter's type, then check
    them."""
    text = values if isinstance(values, str) else None

    def numbers(kind: type, lo: float | None = None, hi: float | None = None) -> list[Value]:
        if text is not None:
            return list(parse_values(text, kind=kind, lo=lo, hi=hi, limit=limit))
        return list(_numbers(values, kind=kind, lo=lo, hi=hi, limit=limit))

    def words() -> list[str]:
        return _words(text) if text is not None else _item_words(values)

    if param == "weight":
        found = numbers(float, 0.0, 1e6)
    else:
        info = spec.params.get(param)
        if info is None:
            raise SweepError(
                f"{term} has no parameter {param}; it has: {', '.join(['weight', *spec.params])}."
            )
        type_name = info.type.__name__
        if type_name in ("int", "float"):
            found = numbers(info.type)
        elif type_name == "bool":
            found = list(_booleans(words()))
        elif type_name == "str" and info.choices:
            found = list(_choices(words(), choices=tuple(info.choices), limit=limit))
        else:
            raise SweepError(f"{term}.{param} cannot be swept; set it in the recipe.")
    return check_term_values(f"{term}.{param}", found, limit=limit)


def check_term_values(axis: str, values: Sequence[Any], *, limit: int) -> list[Value]:
    """Check already-parsed values of a term sweep (``axis`` is ``TERM.PARAM``) against the engine's schema.

    Returns the values in the engine's normal form (floats for float parameters).

    Raises:
        SweepError: an unknown term or parameter, a parameter that cannot be swept, a bad or repeated value,
            or more than ``limit`` values.
    """
    from workers.engine.errors import ConfigError
    from workers.engine.terms import LOSS_TERMS, validate_term_params

    match = _AXIS_RE.match(axis)
    if match is None:
        raise SweepError("name a term parameter as TERM.PARAM, e.g. kd.temperature.")
    term, param = match["term"], match["param"]
    spec = LOSS_TERMS.get(term)
    if spec is None:
        raise SweepError(f"there is no loss term {term}; terms: {', '.join(LOSS_TERMS)}.")
    if not values:
        raise SweepError("give at least one value.")
    if len(values) > limit:
        raise SweepError(f"this gives {len(values):,} values; at most {limit:,} fit in one experiment.")
    cleaned: list[Value] = []
    for value in values:
        if param == "weight":
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or not 0 <= value <= 1e6
            ):
                raise SweepError(f"a term weight is a number between 0 and 1e6, not {_clip(repr(value))}.")
            cleaned.append(float(value))
            continue
        if param not in spec.params:
            raise SweepError(
                f"{term} has no parameter {param}; it has: {', '.join(['weight', *spec.params])}."
            )
        if spec.params[param].type.__name__ == "list":
            raise SweepError(f"{term}.{param} cannot be swept; set it in the recipe.")
        try:
            cleaned.append(validate_term_params(term, {param: value})[param])
        except ConfigError as exc:
            raise SweepError(str(exc)) from None
    if len(set(cleaned)) != len(cleaned):
        raise SweepError("each value may appear once.")
    return cleaned


def term_axis(axis: str) -> tuple[str, str]:
    """``"kd.temperature"`` → ``("kd", "temperature")``."""
    term, _, param = axis.partition(".")
    return term, param


def recipe_axes(term_names: Iterable[str], axes: Mapping[str, Sequence[Value]]) -> dict[str, Sequence[Value]]:
    """The term sweeps that apply to a recipe with these terms (its other term sweeps leave it alone)."""
    names = set(term_names)
    return {axis: values for axis, values in axes.items() if term_axis(axis)[0] in names}


def apply_term_values(
    terms: Sequence[Mapping[str, Any]], values: Mapping[str, Value]
) -> list[dict[str, Any]]:
    """A copy of a recipe's terms with swept values set (a scheduled weight starts at the swept weight)."""
    result = []
    for term in terms:
        copy = {**term, "params": dict(term.get("params") or {})}
        if term.get("schedule"):
            copy["schedule"] = {k: dict(v) for k, v in term["schedule"].items()}
        for axis, value in values.items():
            name, param = term_axis(axis)
            if name != term.get("name"):
                continue
            if param == "weight":
                copy["weight"] = value
                if "weight" in copy.get("schedule", {}):
                    copy["schedule"]["weight"]["start"] = value
            else:
                copy["params"][param] = value
        result.append(copy)
    return result


def format_number(value: Value) -> str:
    """A short, readable value: ``0.0003`` → ``3e-4``, ``4.0`` → ``4``, ``0.25`` → ``0.25``."""
    if isinstance(value, bool) or isinstance(value, str):
        return str(value).lower()
    if isinstance(value, int) or float(value).is_integer() and abs(value) < 1e6:
        return str(int(value))
    if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e6):
        mantissa, exponent = f"{value:.3e}".split("e")
        mantissa = mantissa.rstrip("0").rstrip(".")
        return f"{mantissa}e{int(exponent)}"
    return f"{value:.4g}"


def exact(value: Value) -> str:
    """One value exactly as a field shows it (``True`` → ``true``, ``4.0`` → ``4``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value)
