"""``?limit=&offset=`` on every list: bad values are a 400, and a page is at most MAX_LIMIT rows."""

from __future__ import annotations

from rest_framework import exceptions, pagination

DEFAULT_LIMIT = 50
MAX_LIMIT = 500


class CappedLimitOffsetPagination(pagination.LimitOffsetPagination):
    default_limit = DEFAULT_LIMIT
    max_limit = MAX_LIMIT

    def _param(self, request, name: str, default: int | None) -> int | None:
        raw = request.query_params.get(name)
        if raw in (None, ""):
            return default
        if not raw.isdigit() or len(raw) > 12:
            raise exceptions.ValidationError({name: ["Enter a whole number, 0 or more."]})
        return int(raw)

    def get_limit(self, request) -> int:
        limit = self._param(request, self.limit_query_param, self.default_limit)
        if limit == 0:
            raise exceptions.ValidationError({self.limit_query_param: ["Ask for at least 1 row."]})
        return min(limit, self.max_limit)

    def get_offset(self, request) -> int:
        return self._param(request, self.offset_query_param, 0)

    def paginate_queryset(self, queryset, request, view=None):
        """The page first; the total is counted only when the page cannot tell it (a full page, or an empty
        page past the first), so a list shorter than a page costs one query, not two."""
        self.request = request
        self.limit = self.get_limit(request)
        self.offset = self.get_offset(request)
        rows = list(queryset[self.offset:self.offset + self.limit])
        if 0 < len(rows) < self.limit or (not rows and self.offset == 0):
            self.count = self.offset + len(rows)
        else:
            self.count = self.get_count(queryset)
        if self.count > self.limit and self.template is not None:
            self.display_page_controls = True
        return rows

    def get_schema_operation_parameters(self, view):
        parameters = super().get_schema_operation_parameters(view)
        for parameter in parameters:
            if parameter["name"] == self.limit_query_param:
                parameter["description"] = f"Rows per page (default {DEFAULT_LIMIT}, at most {MAX_LIMIT})."
                parameter["schema"] = {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT}
            elif parameter["name"] == self.offset_query_param:
                parameter["schema"] = {"type": "integer", "minimum": 0}
        return parameters
