"""Django admin for platform staff: organizations, memberships, quotas, tokens (never their secrets), jobs."""

from django.contrib import admin

from portal.models import ApiToken, AuditEntry, Invitation, Job, JobEvent, Membership, Organization, Quota


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0
    raw_id_fields = ["user"]


class QuotaInline(admin.StackedInline):
    model = Quota
    can_delete = False


@admin.register(Organization)
class OrganizationAdmin(admin.ModelAdmin):
    list_display = ["slug", "name", "created_at", "is_platform"]
    search_fields = ["slug", "name"]
    inlines = [QuotaInline, MembershipInline]


@admin.register(Quota)
class QuotaAdmin(admin.ModelAdmin):
    list_display = [
        "organization",
        "max_gpus",
        "borrowing_limit_gpus",
        "gpu_hours_per_month",
        "max_queued_jobs",
        "fair_share_weight",
    ]
    search_fields = ["organization__slug"]


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ["name", "lookup", "user", "organization", "created_at", "last_used_at", "revoked_at"]
    # The hash is useless to staff and is kept out of every form.
    exclude = ["secret_hash"]
    readonly_fields = ["lookup", "pepper_id", "user", "organization", "scopes", "created_at", "last_used_at"]
    search_fields = ["name", "lookup", "user__username"]

    def has_add_permission(self, request) -> bool:
        return False  # tokens are created through the API, where the secret is shown once


@admin.register(AuditEntry)
class AuditEntryAdmin(admin.ModelAdmin):
    """Read-only: the log is written by the services only (the console's Audit log page has the downloads)."""

    list_display = ["created_at", "organization", "actor_label", "action", "target_label", "ip"]
    list_filter = ["action"]
    search_fields = ["organization__slug", "actor_label", "target_label"]
    date_hierarchy = "created_at"

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Invitation)
class InvitationAdmin(admin.ModelAdmin):
    list_display = ["email", "organization", "role", "created_at", "expires_at", "accepted_at", "revoked_at"]
    exclude = ["secret_hash"]

    def has_add_permission(self, request) -> bool:
        return False


class JobEventInline(admin.TabularInline):
    model = JobEvent
    extra = 0
    can_delete = False
    readonly_fields = [
        "seq",
        "kind",
        "created_at",
        "actor_label",
        "from_state",
        "to_state",
        "message",
        "data",
    ]
    exclude = ["actor_user", "actor_token"]

    def has_add_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Job)
class JobAdmin(admin.ModelAdmin):
    list_display = ["id", "name", "organization", "kind", "state", "gpus", "created_at"]
    list_filter = ["state", "kind"]
    search_fields = ["name", "organization__slug"]
    # State changes go through the job services (they record events); the admin only looks.
    readonly_fields = [f.name for f in Job._meta.fields]
    inlines = [JobEventInline]

    def has_add_permission(self, request) -> bool:
        return False
