"""A list page counts its total only when the page itself cannot tell it."""

from __future__ import annotations

import pytest
from rest_framework.request import Request
from rest_framework.test import APIRequestFactory

from api.pagination import CappedLimitOffsetPagination


class Rows(list):
    """A list that records whether its total was asked for (as a queryset's ``count()`` would be)."""

    counted = 0

    def count(self) -> int:  # type: ignore[override]
        Rows.counted += 1
        return len(self)

    def __getitem__(self, item):
        return Rows(super().__getitem__(item)) if isinstance(item, slice) else super().__getitem__(item)


@pytest.mark.parametrize(
    ("total", "query", "page_len", "counted"),
    [
        (7, "limit=5", 5, True),  # a full page: more may follow
        (3, "limit=5", 3, False),  # a short first page is the whole list
        (12, "limit=5&offset=10", 2, False),  # a short last page: offset + its rows
        (12, "limit=5&offset=20", 0, True),  # past the end: the total says how far
        (0, "limit=5", 0, False),  # nothing at all
        (5, "limit=5", 5, True),  # exactly one full page
    ],
)
def test_the_total_is_exact_and_counted_only_when_needed(total, query, page_len, counted):
    Rows.counted = 0
    paginator = CappedLimitOffsetPagination()
    request = Request(APIRequestFactory().get(f"/api/runs/?{query}"))
    page = paginator.paginate_queryset(Rows(range(total)), request)
    assert len(page) == page_len
    assert paginator.count == total
    assert bool(Rows.counted) is counted
    body = paginator.get_paginated_response(page).data
    assert body["count"] == total
    assert (body["next"] is not None) == (paginator.offset + paginator.limit < total)
