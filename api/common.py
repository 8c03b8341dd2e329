"""What the API's views share: one page shape for lists, and query parameters validated into 400s.

A list answers LimitOffsetPagination's envelope (`count`, `next`, `previous`, `results`; documented by
`api.schema.paginated`); query parameters go through a strict filter serializer, so a bad or unknown one is a
400 in the API's one error shape (api/errors.py) rather than silently ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from django.db.models import IntegerField, QuerySet, Subquery
from rest_framework import serializers
from rest_framework.pagination import LimitOffsetPagination
from rest_framework.response import Response

from api.serializers import StrictSerializer


class _CountOf(Subquery):
    template = "(SELECT count(*) FROM (%(subquery)s) page_count)"
    output_field = IntegerField()


class Pagination(LimitOffsetPagination):
    default_limit = 50
    max_limit = 200

    def paginate_counted(self, queryset: QuerySet, request, view=None) -> list[Any]:
        """`paginate_queryset` in one query: the page's rows each carry the total, an uncorrelated subquery.

        PostgreSQL runs the count once (an InitPlan) and still reads only the page's rows in index order, as
        the two queries did (`count(*) OVER ()` would read and sort every row of the list first). Only an
        empty page (no rows, or an offset past the end) costs the separate count.
        """
        self.request = request
        self.limit = self.get_limit(request)
        self.offset = self.get_offset(request)
        total = _CountOf(queryset.order_by().values("pk"))
        page = list(queryset.annotate(_page_total=total)[self.offset : self.offset + self.limit])
        self.count = page[0]._page_total if page else self.get_count(queryset)
        if self.count > self.limit and self.template is not None:
            self.display_page_controls = True
        return page


class PageFilter(StrictSerializer):
    """`limit` and `offset` for a filter serializer of a paginated list: out of range is a 400."""

    limit = serializers.IntegerField(required=False, min_value=1, max_value=Pagination.max_limit)
    offset = serializers.IntegerField(required=False, min_value=0)

    def get_fields(self):
        # After the subclass's own filters, as when each list declared them last: the error message names
        # the first invalid field, so the order is part of the answer.
        fields = super().get_fields()
        for name in ("limit", "offset"):
            fields[name] = fields.pop(name)
        return fields


def page_response(
    view,
    request,
    queryset: Iterable[Any],
    serializer_class: type[serializers.Serializer],
    row: Callable[[Any], Any] | None = None,
    *,
    counted: bool = False,
) -> Response:
    """One page of `queryset` (`limit`/`offset` from the request), each item serialized (after `row`).

    `counted`: the page and its total in one query (`Pagination.paginate_counted`).
    """
    paginator = Pagination()
    if counted:
        page = paginator.paginate_counted(queryset, request, view=view)  # type: ignore[arg-type]
    else:
        page = paginator.paginate_queryset(queryset, request, view=view)
    items = [row(item) for item in page] if row else page
    return paginator.get_paginated_response(serializer_class(items, many=True).data)


def query_dict(request, multi: tuple[str, ...] = ()) -> dict[str, Any]:
    """The query string as a dict: the last value of each parameter, or all of them for those in `multi`."""
    data: dict[str, Any] = {}
    for key in request.query_params:
        values = request.query_params.getlist(key)
        data[key] = values if key in multi else values[-1]
    return data


def query_filters(request, filter_class: type[serializers.Serializer], multi: tuple[str, ...] = ()) -> dict:
    """The query parameters validated by `filter_class`; a ValidationError (400) when they are not valid."""
    f = filter_class(data=query_dict(request, multi))
    f.is_valid(raise_exception=True)
    return dict(f.validated_data)
