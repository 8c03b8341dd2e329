"""OpenTinker SDK: job spec types, REST client and CLI.

This package is what a tenant installs. It imports pydantic and httpx only: never Django, never torch.
"""

from opentinker.spec import JobSpec, JobState

__all__ = ["JobSpec", "JobState"]
__version__ = "0.1.0"
