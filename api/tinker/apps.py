from django.apps import AppConfig


class TinkerApiConfig(AppConfig):
    name = "api.tinker"
    label = "tinker"
    verbose_name = "Tinker-compatible training API"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # The domain restarts a lost model server only while a session may call it (it cannot import us).
        from api.tinker.selectors import base_model_has_live_session
        from portal.services.model_servers import register_live_sessions

        register_live_sessions(base_model_has_live_session)
