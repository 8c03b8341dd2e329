"""OpenAPI extensions: describe our token and session authentication to drf-spectacular."""

from drf_spectacular.contrib import pydantic as _pydantic  # noqa: F401  (JobSpec request bodies)
from drf_spectacular.extensions import OpenApiAuthenticationExtension


class ApiTokenScheme(OpenApiAuthenticationExtension):
    target_class = "api.auth.ApiTokenAuthentication"
    name = "ApiToken"

    def get_security_definition(self, auto_schema):
        return {"type": "http", "scheme": "bearer", "bearerFormat": "otk_<lookup>_<secret>"}
