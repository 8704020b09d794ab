"""Structured input (an API body, a YAML document, JSON typed into a form) checked where it is decoded, before
any field reads it: Postgres refuses the NUL character in text and jsonb, a lone surrogate cannot be encoded
as UTF-8, and jsonb has no NaN or infinity, so each would otherwise fail as a database error (a 500) long
after the input was accepted."""

from __future__ import annotations

import json
import math
from typing import Any

from django.core.exceptions import ValidationError

# Every structured input (an API body, a YAML document, a JSON text typed into a form) passes this check where
# it is decoded, before any field reads it: Postgres refuses the NUL character in text and jsonb, a lone
# surrogate cannot be encoded as UTF-8, and jsonb has no NaN or infinity, so each would otherwise fail as a
# database error (a 500) long after the input was accepted.
MAX_NESTING = 20


_TEXT_LIMIT = 40  # characters of a key shown in a message


def _shown_key(key: str) -> str:
    """A key as it may appear in a message: escaped when it is not plain printable text, and cut short."""
    if key.isidentifier() and len(key) <= _TEXT_LIMIT:
        return key
    return json.dumps(key[:_TEXT_LIMIT])  # ASCII escapes: no NUL or surrogate reaches the message


def _text_problem(text: str) -> str | None:
    if "\x00" in text:
        return "contains the NUL character (\\u0000), which cannot be stored"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode (it holds a lone surrogate such as \\ud800)"
    return None


def _first_problem(value: Any, where: str) -> tuple[str, str] | None:
    """(where, what) of the first part of ``value`` that cannot be accepted, or None."""
    stack: list[tuple[Any, str, int]] = [(value, where, 0)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, str):
            if problem := _text_problem(item):
                return path, f"the text {problem}"
        elif isinstance(item, bool) or item is None or isinstance(item, int):
            continue
        elif isinstance(item, float):
            if not math.isfinite(item):
                return path, "give a finite number (not NaN or infinity)"
        elif isinstance(item, list | tuple | dict):
            if depth >= MAX_NESTING:
                return path, f"nested deeper than {MAX_NESTING} levels"
            if isinstance(item, dict):
                for key, child in item.items():
                    if not isinstance(key, str):
                        return path, f"keys must be text, not {type(key).__name__} ({str(key)[:_TEXT_LIMIT]})"
                    if problem := _text_problem(key):
                        return path, f"a key {problem}"
                    stack.append((child, f"{path}.{_shown_key(key)}" if path else _shown_key(key), depth + 1))
            else:
                stack.extend((child, f"{path}[{i}]", depth + 1) for i, child in enumerate(item))
        else:
            return path, (
                f"a {type(item).__name__} value is not accepted; give text, a number, true/false, null, "
                f"a list or an object"
            )
    return None


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + "."


def _message(found: tuple[str, str], *, field: str = "") -> str:
    """The problem as a message for ``field``'s errors: its path shown unless it is the field itself."""
    path, problem = found
    return _sentence(problem) if path in ("", field) else f"{path}: {problem}."


def data_problem(value: Any, *, where: str = "") -> str | None:
    """Why ``value`` (decoded JSON or YAML) cannot be accepted as input, or None.

    Accepted: text, finite numbers, true/false, null, lists, and objects with text keys, nested at most
    ``MAX_NESTING`` levels; text (keys too) without NUL characters or lone surrogates. ``where`` names the
    value in the message ("config" gives "config.a: the text contains ...").
    """
    found = _first_problem(value, where)
    return _message(found) if found else None


def data_errors(data: Any) -> dict[str, list[str]]:
    """:func:`data_problem` for a whole request body or document: ``{field: [message]}`` keyed by the
    top-level key that holds the problem (a problem in a top-level key itself, or in a body that is not an
    object, under ``non_field_errors``). Empty when everything can be stored."""
    if not isinstance(data, dict):
        found = _first_problem(data, "")
        return {"non_field_errors": [_message(found)]} if found else {}
    errors: dict[str, list[str]] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            errors.setdefault("non_field_errors", []).append("Field names must be text.")
        elif key_problem := _text_problem(key):
            errors.setdefault("non_field_errors", []).append(f"A field name {key_problem}.")
        elif found := _first_problem(value, key):
            errors[key] = [_message(found, field=key)]
    return errors


def check_data(value: Any, *, field: str) -> Any:
    """``value`` unchanged, or a ValidationError keyed ``field`` saying what in it cannot be accepted."""
    if found := _first_problem(value, field):
        raise ValidationError({field: _message(found, field=field)})
    return value
