from django.apps import AppConfig


class ApiConfig(AppConfig):
    name = "api"
    verbose_name = "OpenTinker REST API"

    def ready(self) -> None:
        # Registers the OpenAPI extensions (token auth scheme, pydantic request bodies).
        from api import schema  # noqa: F401
