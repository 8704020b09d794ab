"""Sorting and pagination for the list pages.

A list page offers a fixed set of sort keys (``?sort=name``, ``?sort=-created_at``); anything else falls back
to the page's default, so a hand-edited URL never fails. Pages hold ``PER_PAGE`` rows (``?page=``; a page
number out of range shows the nearest page). Ordering always ends with the primary key so that rows with equal
sort values keep their place from one page to the next.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from django.core.paginator import Page, Paginator
from django.db.models import F, OrderBy, QuerySet
from django.http import HttpRequest

PER_PAGE = 25


@dataclass(frozen=True)
class SortColumn:
    """What a sortable column header shows: the ``sort`` value its link asks for and its current state."""

    param: str
    direction: str  # "ascending", "descending" or "" (not sorted by this column); used for aria-sort


@dataclass(frozen=True)
class ListPage:
    page: Page
    sort: str
    columns: dict[str, SortColumn]


def _order_by(fields: tuple[str, ...], descending: bool) -> list[OrderBy]:
    # NULLs last either way: a missing parameter count is never "the largest".
    return [F(f).desc(nulls_last=True) if descending else F(f).asc(nulls_last=True) for f in (*fields, "pk")]


def list_page(
    request: HttpRequest,
    queryset: QuerySet,
    *,
    sorts: Mapping[str, tuple[str, ...]],
    default: str,
    descending_first: frozenset[str] = frozenset(),
    per_page: int = PER_PAGE,
) -> ListPage:
    """One page of ``queryset`` sorted as ``?sort=`` asks (a key of ``sorts``, ``-`` for descending).

    Args:
        sorts: sort key → the fields it orders by, e.g. ``{"name": ("name",), "team": ("team__name",
        "name")}``. default: the sort used when ``?sort=`` is missing or not offered, e.g. ``"-created_at"``.
        descending_first: keys whose header link sorts descending first (dates, counts, sizes).
    """
    sort = request.GET.get("sort", "")
    key = sort.removeprefix("-")
    if key not in sorts:
        sort, key = default, default.removeprefix("-")
    descending = sort.startswith("-")
    page = Paginator(queryset.order_by(*_order_by(sorts[key], descending)), per_page).get_page(
        request.GET.get("page")
    )
    columns = {}
    for name in sorts:
        if name == key:
            columns[name] = SortColumn(
                name if descending else f"-{name}", "descending" if descending else "ascending"
            )
        else:
            columns[name] = SortColumn(f"-{name}" if name in descending_first else name, "")
    return ListPage(page=page, sort=sort, columns=columns)
