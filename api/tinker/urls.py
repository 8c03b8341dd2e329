"""Mounted at `/tinker/` by the root URL conf: the SDK's base URL is `http://<host>/tinker`."""

from django.urls import include, path

from api.tinker import views

v1 = [
    path("client/config", views.client_config),
    path("create_session", views.create_session),
    path("session_heartbeat", views.session_heartbeat),
    path("sessions/<str:session_id>/finish", views.session_finish),
    path("telemetry", views.telemetry),
    path("create_model", views.create_model),
    path("load_weights", views.load_weights),
    path("get_info", views.get_info),
    path("forward_backward", views.forward_backward),
    path("optim_step", views.optim_step),
    path("save_weights", views.save_weights),
    path("save_weights_for_sampler", views.save_weights_for_sampler),
    path("create_sampling_session", views.create_sampling_session),
    path("samplers/<str:sampler_id>", views.get_sampler),
    path("asample", views.asample),
    path("retrieve_future", views.retrieve_future),
    path("sessions", views.list_sessions),
    path("training_runs", views.list_training_runs),
    path("training_runs/<str:model_id>/checkpoints", views.list_checkpoints),
    path("checkpoints", views.list_user_checkpoints),
]

urlpatterns = [
    path("api/v1/", include(v1)),
    path("ingest/outcomes", views.ingest_outcomes),
]
