"""Django admin for platform staff: organizations, memberships, quotas, tokens (never their secrets), jobs.

The admin writes rows directly, past the services that record the audit log, so what it changes of the
audited kinds (quotas, roles and memberships, token revocation) is recorded here, `via: django-admin`."""

from typing import Any

from django.contrib import admin

from portal.models import ApiToken, AuditEntry, Invitation, Job, JobEvent, Membership, Organization, Quota
from portal.models.audit import AuditAction
from portal.services.audit import audit_record

VIA = "django-admin"


def _plain(value: Any) -> Any:
    """A JSON value for the audit entry's details (dates, model instances: their text)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return str(value)


def _changes(form) -> dict[str, dict[str, Any]]:
    return {
        f: {"from": _plain(form.initial.get(f)), "to": _plain(form.cleaned_data.get(f))}
        for f in form.changed_data
    }


def _audit_quota(request, quota: Quota, form) -> None:
    org = quota.organization
    audit_record(
        AuditAction.QUOTA_CHANGED,
        organization=org,
        user=request.user,
        target=("quota", org.pk, org.slug),
        details={"changes": _changes(form), "via": VIA},
    )


def _audit_membership(request, membership: Membership, form, *, removed: bool = False) -> None:
    if removed:
        action, details = AuditAction.MEMBER_REMOVED, {"role": membership.role, "via": VIA}
    else:  # a role changed, or a member added here (from: null)
        before = form.initial.get("role") if membership.pk and "user" not in form.changed_data else None
        action, details = AuditAction.MEMBER_ROLE_CHANGED, {"from": before, "to": membership.role, "via": VIA}
    audit_record(
        action,
        organization=membership.organization,
        user=request.user,
        target=("user", membership.user_id, membership.user.get_username()),
        details=details,
    )


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

    def save_formset(self, request, form, formset, change) -> None:
        forms = [f for f in formset.forms if f.has_changed() and not (f.cleaned_data or {}).get("DELETE")]
        super().save_formset(request, form, formset, change)
        for f in forms:
            if isinstance(f.instance, Quota):
                _audit_quota(request, f.instance, f)
            elif isinstance(f.instance, Membership) and {"role", "user"} & set(f.changed_data):
                _audit_membership(request, f.instance, f)
        for obj in formset.deleted_objects:
            if isinstance(obj, Membership):
                _audit_membership(request, obj, None, removed=True)


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

    def save_model(self, request, obj, form, change) -> None:
        super().save_model(request, obj, form, change)
        if change and form.changed_data:
            _audit_quota(request, obj, form)


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ["name", "lookup", "user", "organization", "created_at", "last_used_at", "revoked_at"]
    # The hash is useless to staff and is kept out of every form.
    exclude = ["secret_hash"]
    readonly_fields = ["lookup", "pepper_id", "user", "organization", "scopes", "created_at", "last_used_at"]
    search_fields = ["name", "lookup", "user__username"]

    def has_add_permission(self, request) -> bool:
        return False  # tokens are created through the API, where the secret is shown once

    def save_model(self, request, obj, form, change) -> None:
        super().save_model(request, obj, form, change)
        if "revoked_at" in form.changed_data and obj.revoked_at is not None:
            audit_record(
                AuditAction.TOKEN_REVOKED,
                organization=obj.organization,
                user=request.user,
                target=obj,
                details={"via": VIA},
            )


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
