"""URLs of the portal's pages. Each concern has its own module in portal/web/."""

from django.urls import path

from portal.web import auth, compare, dashboard, jobs, orgs, rollouts, tokens

urlpatterns = [
    path("", dashboard.dashboard, name="home"),
    path("accounts/login/", auth.login_view, name="login"),
    path("accounts/logout/", auth.logout_view, name="logout"),
    path("accounts/signup/", auth.signup, name="signup"),
    path("orgs/new/", orgs.org_create, name="org_create"),
    path("orgs/switch/", orgs.org_switch, name="org_switch"),
    path("jobs/", jobs.job_index, name="jobs"),
    path("jobs/new/", jobs.job_new, name="job_new"),
    path("jobs/compare/", compare.job_compare, name="job_compare"),  # before jobs/<id>/, which would take it
    path("jobs/<str:job_id>/", jobs.job_detail, name="job_detail"),
    path("jobs/<str:job_id>/status/", jobs.job_status, name="job_status"),
    path("jobs/<str:job_id>/rollouts/", rollouts.job_rollouts, name="job_rollouts"),
    path("jobs/<str:job_id>/cancel/", jobs.job_cancel_view, name="job_cancel"),
    path("jobs/<str:job_id>/resume/", jobs.job_resume_view, name="job_resume"),
    path("jobs/<str:job_id>/promote/", jobs.job_promote_view, name="job_promote"),
    path("tokens/", tokens.token_index, name="tokens"),
    path("tokens/<int:token_id>/", tokens.token_detail, name="token_detail"),
    path("tokens/<int:token_id>/revoke/", tokens.token_revoke_view, name="token_revoke"),
]

# Marketplace, registry (models, datasets), team, usage and the admin console (portal/web/).
from portal.web import console, marketplace, registry, team, usage  # noqa: E402

urlpatterns += [
    path("envs/", marketplace.env_list, name="envs"),
    path("envs/publish/", marketplace.env_publish, name="env_publish"),
    path("envs/<slug:owner>/<slug:name>/", marketplace.env_detail, name="env_detail"),
    path("envs/<slug:owner>/<slug:name>/star/", marketplace.env_star, name="env_star"),
    path("envs/<slug:owner>/<slug:name>/fork/", marketplace.env_fork, name="env_fork"),
    path("envs/<slug:owner>/<slug:name>/settings/", marketplace.env_settings, name="env_settings"),
    path("registry/", registry.registry_index, name="registry"),
    path("registry/models/<slug:name>/", registry.model_detail, name="model_detail"),
    path("registry/datasets/<slug:name>/", registry.dataset_detail, name="dataset_detail"),
    path("team/", team.team, name="team"),
    path("team/members/<int:member_id>/role/", team.member_role, name="team_member_role"),
    path("team/members/<int:member_id>/remove/", team.member_remove, name="team_member_remove"),
    path("team/invitations/", team.invitation_new, name="team_invite"),
    path("team/invitations/<int:pk>/revoke/", team.invitation_cancel, name="team_invitation_revoke"),
    path("invitations/accept/", team.invitation_join, name="invitation_accept"),
    path("usage/", usage.usage_page, name="usage"),
    path("console/", console.console_orgs, name="console_orgs"),
    path("console/orgs/<slug:slug>/quota/", console.console_quota, name="console_quota"),
    path("console/pools/", console.console_pools, name="console_pools"),
    path("console/pools/<slug:pool>/enabled/", console.console_pool_enabled, name="console_pool_enabled"),
    path("console/queue/", console.console_queue, name="console_queue"),
    path("console/jobs/<str:job_id>/priority/", console.console_job_priority, name="console_job_priority"),
    path("console/jobs/<str:job_id>/preempt/", console.console_job_preempt, name="console_job_preempt"),
    path("console/usage/", console.console_usage, name="console_usage"),
]

# The audit log: an organization's (its admins) and the platform's (staff), with downloads.
from portal.web import audit  # noqa: E402

urlpatterns += [
    path("team/audit/", audit.team_audit, name="team_audit"),
    path("team/audit/export/", audit.team_audit_export, name="team_audit_export"),
    path("console/audit/", audit.console_audit, name="console_audit"),
    path("console/audit/export/", audit.console_audit_export, name="console_audit_export"),
]

# Training through the Tinker-compatible API (its SDK's own routes are under /tinker/, so the page is not).
from portal.web import tinker  # noqa: E402

urlpatterns += [
    path("training/", tinker.tinker_index, name="tinker"),
    path("console/model-servers/", tinker.console_model_servers, name="console_model_servers"),
]
