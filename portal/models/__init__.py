from portal.models.jobs import Checkpoint, Job, JobEvent, Metric
from portal.models.orgs import Invitation, Membership, Organization, Role
from portal.models.quotas import Quota
from portal.models.tokens import ApiToken, Scope

__all__ = [
    "ApiToken",
    "Checkpoint",
    "Invitation",
    "Job",
    "JobEvent",
    "Membership",
    "Metric",
    "Organization",
    "Quota",
    "Role",
    "Scope",
]
