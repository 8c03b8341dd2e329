"""Quota changes: platform staff only."""

from __future__ import annotations

from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import transaction

from portal.errors import DomainError, Forbidden
from portal.models import AuditAction, Organization, Quota
from portal.services.audit import audit_record

QUOTA_FIELDS = (
    "max_gpus",
    "borrowing_limit_gpus",
    "gpu_hours_per_month",
    "max_queued_jobs",
    "max_cpus_per_job",
    "fair_share_weight",
    "allowed_pools",
)


@transaction.atomic
def quota_set(*, organization: Organization, by, **changes) -> Quota:
    if not (by.is_active and by.is_staff):
        raise Forbidden("only platform staff can change quotas")
    unknown = set(changes) - set(QUOTA_FIELDS)
    if unknown:
        raise DomainError(f"unknown quota fields: {', '.join(sorted(unknown))}", field=sorted(unknown)[0])
    quota = Quota.objects.select_for_update().get(organization=organization)
    before = {field: getattr(quota, field) for field in changes}
    for field, value in changes.items():
        setattr(quota, field, value)
    try:
        quota.full_clean(exclude=["organization"])
    except DjangoValidationError as e:
        field, messages = next(iter(e.message_dict.items()))
        raise DomainError(messages[0], field=field) from None
    quota.save()
    changed = {
        f: {"from": before[f], "to": getattr(quota, f)} for f in changes if before[f] != getattr(quota, f)
    }
    if changed:
        audit_record(
            AuditAction.QUOTA_CHANGED,
            organization=organization,
            user=by,
            target=("quota", organization.pk, organization.slug),
            details={"changes": changed},
        )
    return quota
