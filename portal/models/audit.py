"""The audit log: who changed something that matters to security, in which organization, when, from where.

Rows are written by the services that make those changes, inside the same transaction (both or neither), and
are never updated. An entry names its target by type, id and a label copied at the time, so it still reads
after the target is deleted; secrets' values never appear in it.
"""

from __future__ import annotations

from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.db import models
from django.utils import timezone

from portal.models.orgs import Organization
from portal.models.tokens import ApiToken


class AuditAction(models.TextChoices):
    TOKEN_CREATED = "token.created", "API token created"
    TOKEN_REVOKED = "token.revoked", "API token revoked"
    MEMBER_ROLE_CHANGED = "member.role_changed", "Member's role changed"
    MEMBER_REMOVED = "member.removed", "Member removed (or left)"
    INVITATION_CREATED = "invitation.created", "Invitation created"
    INVITATION_ACCEPTED = "invitation.accepted", "Invitation accepted"
    INVITATION_REVOKED = "invitation.revoked", "Invitation revoked"
    QUOTA_CHANGED = "quota.changed", "Quota changed"
    ENV_SECRET_CREATED = "env_secret.created", "Environment secret created"
    ENV_SECRET_DELETED = "env_secret.deleted", "Environment secret deleted"
    ENV_VISIBILITY_CHANGED = "env.visibility_changed", "Environment package visibility changed"
    JOB_PREEMPTED = "job.preempted", "Job preempted by platform staff"
    JOB_PRIORITY_CHANGED = "job.priority_changed", "Job priority changed by platform staff"
    POOL_CREATED = "pool.created", "Compute pool created"
    POOL_UPDATED = "pool.updated", "Compute pool changed"
    POOL_DELETED = "pool.deleted", "Compute pool deleted"


class AuditEntry(models.Model):
    id = models.BigAutoField(primary_key=True)
    created_at = models.DateTimeField(default=timezone.now)
    # None: a platform-wide action (pools), seen by platform staff only.
    organization = models.ForeignKey(
        Organization, null=True, blank=True, on_delete=models.CASCADE, related_name="audit_entries"
    )
    actor_user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    actor_token = models.ForeignKey(
        ApiToken, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    # "alice", "alice (token ci)" or "system": readable after the user or token is gone.
    actor_label = models.CharField(max_length=200)
    action = models.CharField(max_length=40, choices=AuditAction.choices)
    target_type = models.CharField(max_length=40)
    target_id = models.CharField(max_length=100)
    target_label = models.CharField(max_length=200, blank=True, default="")
    ip = models.GenericIPAddressField(null=True, blank=True)
    user_agent = models.CharField(max_length=300, blank=True, default="")
    details = models.JSONField(default=dict, blank=True, encoder=DjangoJSONEncoder)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["organization", "-created_at"], name="audit_org_time"),
            models.Index(fields=["-created_at"], name="audit_time"),
            models.Index(fields=["action", "-created_at"], name="audit_action_time"),
        ]
        verbose_name_plural = "audit entries"

    def __str__(self) -> str:
        return f"{self.created_at:%Y-%m-%d %H:%M:%S} {self.actor_label} {self.action} {self.target_label}"
