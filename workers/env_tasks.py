"""Celery tasks of the environment registry: thin adapters over env_registry.services.

The worker must import this module (settings: CELERY_IMPORTS = ["workers.env_tasks"]); the producer side
imports it when it enqueues. Validation is idempotent (it acts only on a pending version and the verdict is
written only while the row is still pending), so `acks_late` is safe.
"""

from __future__ import annotations

from celery import shared_task

from env_registry.hub_import import model_import_run
from env_registry.model_registry import ValidationDeferred, model_validate
from env_registry.services import version_validate
from opentinker.env.sandbox import SandboxUnavailable


# A smoke episode is a few sandbox calls with a wall-clock timeout each; a hung package is killed by the
# sandbox well inside these limits.
@shared_task(
    name="env_registry.validate_version",
    time_limit=180,
    soft_time_limit=150,
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=True,
    # A host that cannot start the sandbox leaves the version pending: retried, it is validated once the
    # host is fixed (or the task lands on a worker that can).
    autoretry_for=(SandboxUnavailable,),
    retry_backoff=30,
    retry_backoff_max=600,
    max_retries=12,
)
def validate_version_task(version_id: int) -> str:
    version = version_validate(version_id)
    return version.status if version is not None else "missing"


# A model's check imports transformers and torch in the sandbox (seconds), then reads the config, tokenizer
# and the weights' headers; the sandbox's own limits stop a hostile one well inside these.
@shared_task(
    name="env_registry.validate_model_version",
    time_limit=600,
    soft_time_limit=540,
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=True,
    autoretry_for=(SandboxUnavailable, ValidationDeferred),  # no verdict: not the model's fault
    retry_backoff=30,
    retry_backoff_max=600,
    max_retries=12,
)
def validate_model_version_task(version_id: int) -> str:
    version = model_validate(version_id)
    return version.status if version is not None else "missing"


# Fetching a repository from the Hub: minutes for a few GB; a redelivery finds the version no longer queued.
@shared_task(
    name="env_registry.import_hub_model",
    time_limit=1800,
    soft_time_limit=1740,
    ignore_result=True,
    autoretry_for=(OSError,),  # the network or the store, not the repository (that makes it invalid)
    retry_backoff=60,
    max_retries=3,
)
def import_hub_model_task(version_id: int) -> str:
    version = model_import_run(version_id)
    return version.status if version is not None else "missing"
