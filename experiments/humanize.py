"""Ages and durations in words ("12 s ago", "2 h 5 min"): plain functions for Python code, and the template
filters of the same names (``experiments.templatetags.distill``)."""

from __future__ import annotations

from datetime import datetime, timedelta

from django.utils import timezone


def ago(value: datetime | float | int | None) -> str:
    """A datetime (or an age in seconds) as "12 s ago", "3 min ago", "2 h ago", "4 d ago"; "never" for
    None."""
    if value is None or value == "":
        return "never"
    seconds = (timezone.now() - value).total_seconds() if isinstance(value, datetime) else float(value)
    return "just now" if seconds < 1 else f"{duration(seconds)} ago"


def duration(seconds: float | timedelta | None) -> str:
    """Seconds as "12 s", "3 min", "2 h 5 min", "4 d"."""
    if seconds is None or seconds == "":
        return ""
    if isinstance(seconds, timedelta):
        seconds = seconds.total_seconds()
    if seconds < 1:
        return "<1 s"
    s = int(seconds)
    if s < 120:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    if s < 86400:
        h, m = divmod(s // 60, 60)
        return f"{h} h {m} min" if m else f"{h} h"
    return f"{s // 86400} d"
