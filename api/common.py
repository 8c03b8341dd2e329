"""What the API's views share: one page shape for lists, and query parameters validated into 400s.

A list answers LimitOffsetPagination's envelope (`count`, `next`, `previous`, `results`; documented by
`api.schema.paginated`); query parameters go through a strict filter serializer, so a bad or unknown one is a
400 in the API's one error shape (api/errors.py) rather than silently ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from rest_framework import serializers
from rest_framework.pagination import LimitOffsetPagination
from rest_framework.response import Response

from api.serializers import StrictSerializer


class Pagination(LimitOffsetPagination):
    default_limit = 50
    max_limit = 200


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
) -> Response:
    """One page of `queryset` (`limit`/`offset` from the request), each item serialized (after `row`)."""
    paginator = Pagination()
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
