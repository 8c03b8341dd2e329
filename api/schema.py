"""OpenAPI: our AutoSchema (the error answers each operation can give), paginated list shapes, and the token
authentication scheme, for drf-spectacular.

Every operation documents its success answers and the ones only it can give (409 conflicts, a 404 for an
object named in the body) in its own ``@extend_schema``; `AutoSchema` adds the error answers that follow
from how the operation is wired, all with the API's one error shape (api/errors.py), so the schema says
exactly what a client can get and a generated client never meets an undocumented status:

    401  the operation needs credentials (every one but the public ones)
    403  scope-checked operations (a token or role without the scope; a session in no organization) and the
         staff-only ones
    404  an object named in the path (another organization's ids included); staff-only operations (404 to
         everyone else)
    400  a request body or query/header parameters to validate
    411 / 413  any request that may carry a body (POST, PUT, PATCH, DELETE): chunked with no length, or too
         large (api/middleware.py)
    406  an Accept header without application/json (or */*), where DRF negotiates the answer's type
    415  a request body in another media type than the operation reads
    429  throttled operations (all but the public ones)
"""

from __future__ import annotations

import functools

from drf_spectacular.contrib import pydantic as _pydantic  # noqa: F401  (JobSpec request bodies)
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.openapi import AutoSchema as SpectacularAutoSchema
from drf_spectacular.utils import OpenApiParameter
from rest_framework import serializers
from rest_framework.permissions import AllowAny
from rest_framework.views import APIView

BODY_METHODS = ("POST", "PUT", "PATCH", "DELETE")


class ApiTokenScheme(OpenApiAuthenticationExtension):
    target_class = "api.auth.ApiTokenAuthentication"
    name = "ApiToken"

    def get_security_definition(self, auto_schema):
        return {"type": "http", "scheme": "bearer", "bearerFormat": "otk_<lookup>_<secret>"}


@functools.cache
def paginated(item: type[serializers.Serializer]) -> type[serializers.Serializer]:
    """The envelope LimitOffsetPagination answers with (api.common.Pagination), around `item`."""
    base = item.__name__.removesuffix("Serializer")
    return type(
        f"Paginated{base}ListSerializer",
        (serializers.Serializer,),
        {
            "__module__": item.__module__,
            "__doc__": f"A page of {base} objects: `limit` (default 50, at most 200) from `offset`.",
            "count": serializers.IntegerField(help_text="How many there are in all."),
            "next": serializers.URLField(allow_null=True, help_text="The next page, or null."),
            "previous": serializers.URLField(allow_null=True, help_text="The previous page, or null."),
            "results": item(many=True),
            "paginates": item,
        },
    )


def _pagination_parameters() -> list[OpenApiParameter]:
    # LimitOffsetPagination's own parameters: a value that is not a number is ignored (the default is used)
    # and a limit over the maximum is cut to it, so they never cause a 400.
    limit = OpenApiParameter("limit", int, description="Page size: default 50, at most 200.")
    offset = OpenApiParameter("offset", int, description="How many to skip (default 0).")
    for parameter in (limit, offset):
        parameter.pagination = True
    return [limit, offset]


def _parameter_names(parameters) -> set[str]:
    names: set[str] = set()
    for p in parameters:
        if isinstance(p, OpenApiParameter):
            names.add(p.name)
        else:  # a serializer (class or instance) whose fields are query parameters
            names.update((p() if isinstance(p, type) else p).fields)
    return names


class AutoSchema(SpectacularAutoSchema):
    def _paginated(self) -> bool:
        declared = self.get_response_serializers()
        ok = declared.get(200) if isinstance(declared, dict) else declared
        return getattr(ok, "paginates", None) is not None

    def _get_parameters(self):
        if self.method == "GET" and self._paginated():
            declared = _parameter_names(self.get_override_parameters())
            extra = [p for p in _pagination_parameters() if p.name not in declared]
            if extra:
                original = self.get_override_parameters
                self.get_override_parameters = lambda: [*original(), *extra]
                try:
                    return super()._get_parameters()
                finally:
                    del self.get_override_parameters
        return super()._get_parameters()

    def _get_response_bodies(self, direction="response"):
        from api.serializers import ErrorSerializer

        responses = super()._get_response_bodies(direction)
        for code in self.error_codes():
            if str(code) not in responses:
                error = self._get_response_for_code(ErrorSerializer, str(code), None, direction)
                responses[str(code)] = error
        return dict(sorted(responses.items()))

    def error_codes(self) -> set[int]:
        from api.permissions import HasScope, IsPlatformStaff

        view, method = self.view, self.method
        permissions = view.get_permissions()
        codes: set[int] = set()
        if not all(isinstance(p, AllowAny) for p in permissions):
            codes.add(401)
        # a tuple, not HasScope | IsPlatformStaff: DRF overloads | on permission classes
        if any(isinstance(p, (HasScope, IsPlatformStaff)) for p in permissions):
            codes.add(403)
        if "{" in self.path or any(isinstance(p, IsPlatformStaff) for p in permissions):
            codes.add(404)
        parameters = [
            p
            for p in self.get_override_parameters()
            if getattr(p, "location", "query") != "path" and not getattr(p, "pagination", False)
        ]
        body = method in ("POST", "PUT", "PATCH") and self.get_request_serializer() is not None
        if parameters or body:
            codes.add(400)
        if body:
            codes.add(415)
        if method in BODY_METHODS:
            codes.update((411, 413))
        if view.get_throttles():
            codes.add(429)
        if type(view).perform_content_negotiation is APIView.perform_content_negotiation:
            codes.add(406)  # DRF's negotiation: an Accept header that excludes application/json
        return codes - set(getattr(view, "schema_never_answers", ()))
