from django.apps import AppConfig


class EnvRegistryConfig(AppConfig):
    name = "env_registry"
    verbose_name = "Environment registry"
    default_auto_field = "django.db.models.BigAutoField"
