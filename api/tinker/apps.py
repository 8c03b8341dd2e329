from django.apps import AppConfig


class TinkerApiConfig(AppConfig):
    name = "api.tinker"
    label = "tinker"
    verbose_name = "Tinker-compatible training API"
    default_auto_field = "django.db.models.BigAutoField"
