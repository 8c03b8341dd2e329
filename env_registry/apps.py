from django.apps import AppConfig


class EnvRegistryConfig(AppConfig):
    name = "env_registry"
    verbose_name = "Environment registry"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Imported here: models may be imported only once the app registry is ready.
        from env_registry.dataset_registry import DatasetResolver
        from env_registry.env_refs import RegistryResolver
        from env_registry.model_registry import ModelResolver
        from portal.services import model_refs
        from portal.services.env_refs import register_resolver

        register_resolver(RegistryResolver())
        model_refs.register_resolver(ModelResolver())
        model_refs.register_dataset_resolver(DatasetResolver())
