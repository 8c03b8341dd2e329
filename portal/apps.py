from django.apps import AppConfig


class PortalConfig(AppConfig):
    name = "portal"
    verbose_name = "OpenTinker platform"
    default_auto_field = "django.db.models.BigAutoField"
