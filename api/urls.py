from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerView

from api.views import admin, catalog, jobs, orgs, tokens

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
    path("tokens", tokens.TokenListApi.as_view()),
    path("tokens/<int:token_id>", tokens.TokenDetailApi.as_view()),
    path("jobs", jobs.JobListApi.as_view()),
    path("jobs/<str:job_id>", jobs.JobDetailApi.as_view()),
    path("jobs/<str:job_id>/cancel", jobs.JobCancelApi.as_view()),
    path("jobs/<str:job_id>/metrics", jobs.JobMetricsApi.as_view()),
    path("jobs/<str:job_id>/events", jobs.JobEventsApi.as_view()),
    path("jobs/<str:job_id>/checkpoints", jobs.JobCheckpointsApi.as_view()),
    path(
        "jobs/<str:job_id>/checkpoints/<int:checkpoint_id>/files/<path:name>",
        jobs.CheckpointFileApi.as_view(),
    ),
    path("envs", catalog.EnvironmentListApi.as_view()),
    path("envs/<str:owner>/<str:name>", catalog.EnvironmentDetailApi.as_view()),
    path("models", catalog.ModelListApi.as_view()),
    path("admin/orgs", admin.AdminOrgListApi.as_view()),
    path("admin/orgs/<str:slug>/quota", admin.AdminQuotaApi.as_view()),
]

urlpatterns = [
    path("schema/", SpectacularAPIView.as_view(), name="schema"),
    path("docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="docs"),
    path("redoc/", SpectacularRedocView.as_view(url_name="schema"), name="redoc"),
    path("v1/", include(v1)),
]
