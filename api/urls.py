from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerView

from api.views import admin, catalog, env_secrets, envs, ingest, ingest_env, jobs, orgs, stream, tokens, usage

v1 = [
    path("me", orgs.MeApi.as_view()),
    path("org", orgs.OrgApi.as_view()),
    path("orgs", orgs.OrgCreateApi.as_view()),
    path("org/quota", orgs.OrgQuotaApi.as_view()),
    path("org/members", orgs.MemberListApi.as_view()),
    path("org/members/<int:member_id>", orgs.MemberDetailApi.as_view()),
    path("org/invitations", orgs.InvitationListApi.as_view()),
    path("org/invitations/<int:invitation_id>", orgs.InvitationDetailApi.as_view()),
    path("invitations/accept", orgs.InvitationAcceptApi.as_view()),
    path("org/env-secrets", env_secrets.EnvironmentSecretListApi.as_view()),
    path("org/env-secrets/<str:name>", env_secrets.EnvironmentSecretDetailApi.as_view()),
    path("tokens", tokens.TokenListApi.as_view()),
    path("tokens/<int:token_id>", tokens.TokenDetailApi.as_view()),
    path("jobs", jobs.JobListApi.as_view()),
    path("jobs/<str:job_id>", jobs.JobDetailApi.as_view()),
    path("jobs/<str:job_id>/cancel", jobs.JobCancelApi.as_view()),
    path("jobs/<str:job_id>/metrics", jobs.JobMetricsApi.as_view()),
    path("jobs/<str:job_id>/events", jobs.JobEventsApi.as_view()),
    path("jobs/<str:job_id>/checkpoints", jobs.JobCheckpointsApi.as_view()),
    path("jobs/<str:job_id>/stream", stream.JobStreamApi.as_view()),
    path(
        "jobs/<str:job_id>/checkpoints/<int:checkpoint_id>/files/<path:name>",
        jobs.CheckpointFileApi.as_view(),
    ),
    path("ingest/jobs/<str:job_id>/metrics", ingest.IngestMetricsApi.as_view()),
    path("ingest/jobs/<str:job_id>/events", ingest.IngestEventsApi.as_view()),
    path("ingest/jobs/<str:job_id>/logs", ingest.IngestLogsApi.as_view()),
    path("ingest/jobs/<str:job_id>/checkpoints", ingest.IngestCheckpointsApi.as_view()),
    path("ingest/jobs/<str:job_id>/heartbeat", ingest.IngestHeartbeatApi.as_view()),
    path("ingest/jobs/<str:job_id>/state", ingest.IngestStateApi.as_view()),
    path("ingest/jobs/<str:job_id>/environment", ingest_env.IngestEnvironmentApi.as_view()),
    path("envs", envs.EnvironmentListApi.as_view()),
    path("envs/<str:owner>/<str:name>", envs.EnvironmentDetailApi.as_view()),
    path("envs/<str:owner>/<str:name>/star", envs.EnvironmentStarApi.as_view()),
    path("envs/<str:owner>/<str:name>/fork", envs.EnvironmentForkApi.as_view()),
    path("envs/<str:owner>/<str:name>/versions/<str:version>/archive", envs.EnvironmentArchiveApi.as_view()),
    path("models", catalog.ModelListApi.as_view()),
    path("admin/orgs", admin.AdminOrgListApi.as_view()),
    path("admin/orgs/<str:slug>/quota", admin.AdminQuotaApi.as_view()),
    path("admin/pools", admin.AdminPoolListApi.as_view()),
    path("admin/pools/<str:pool>", admin.AdminPoolDetailApi.as_view()),
    path("admin/queue", admin.AdminQueueApi.as_view()),
    path("admin/jobs/<str:job_id>/preempt", admin.AdminPreemptApi.as_view()),
    path("admin/usage", admin.AdminUsageApi.as_view()),
    path("org/usage", usage.OrgUsageApi.as_view()),
]

urlpatterns = [
    path("schema/", SpectacularAPIView.as_view(), name="schema"),
    path("docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="docs"),
    path("redoc/", SpectacularRedocView.as_view(url_name="schema"), name="redoc"),
    path("v1/", include(v1)),
]
