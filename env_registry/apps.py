from django.apps import AppConfig


class EnvRegistryConfig(AppConfig):
    name = "env_registry"
    verbose_name = "Environment registry"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Imported here: models may be imported only once the app registry is ready.
        from env_registry.env_refs import RegistryResolver
        from portal.services.env_refs import register_resolver

        register_resolver(RegistryResolver())
