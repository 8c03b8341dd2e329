from django.apps import AppConfig


class PortalConfig(AppConfig):
    name = "portal"
    verbose_name = "OpenTinker platform"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Registers the system check that the pages' front-end bundle was built.
        from portal.web import checks  # noqa: F401
