from django.apps import AppConfig


class PortalConfig(AppConfig):
    name = "portal"
    verbose_name = "OpenTinker platform"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.conf import settings

        from portal.async_middleware import deploy_checks_see_subclasses
        from portal.observability.errors import sentry_init
        from portal.web import checks  # noqa: F401  (registers the check that the front-end bundle was built)

        deploy_checks_see_subclasses()
        # Error reports when SENTRY_DSN is set (web and Celery processes alike load this app).
        sentry_init(settings.SENTRY_DSN, environment=settings.MODE)
