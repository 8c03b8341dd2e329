from portal.models.audit import AuditAction, AuditEntry
from portal.models.env_secrets import EnvironmentSecret
from portal.models.jobs import MODEL_SERVER_KIND, Checkpoint, Job, JobEvent, Metric
from portal.models.logs import JobLog
from portal.models.orgs import Invitation, Membership, Organization, Role
from portal.models.pools import Allocation, ComputePool
from portal.models.quotas import Quota
from portal.models.rollouts import RolloutStep
from portal.models.tokens import ApiToken, Scope
from portal.models.usage import FairShareUsage, UsageRecord

__all__ = [
    "MODEL_SERVER_KIND",
    "Allocation",
    "ApiToken",
    "AuditAction",
    "AuditEntry",
    "Checkpoint",
    "ComputePool",
    "EnvironmentSecret",
    "FairShareUsage",
    "Invitation",
    "Job",
    "JobEvent",
    "JobLog",
    "Membership",
    "Metric",
    "Organization",
    "Quota",
    "Role",
    "RolloutStep",
    "Scope",
    "UsageRecord",
]
