"""Compute pools: registering, updating, capacity and health reports."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import transaction
from django.utils import timezone

from portal.errors import Conflict, DomainError
from portal.models import Allocation, AuditAction, ComputePool
from portal.services.audit import audit_record

POOL_FIELDS = ("driver", "ray_address", "enabled", "labels")


@dataclass(frozen=True)
class PoolCapacity:
    """What a pool's driver reads of it: GPUs by type or, on a pool without any GPU, CPU slots (a slot is
    scheduled like a GPU, under the type ``cpu-slot``)."""

    gpus_by_type: Mapping[str, int]
    cpus: int
    memory_bytes: int
    cpu_slots: bool

    @classmethod
    def measured(
        cls, gpus_by_type: Mapping[str, int], cpus: int, memory_bytes: int, slots: int = 0
    ) -> PoolCapacity:
        """From a machine's or cluster's resources: its GPUs, or without any, ``slots`` CPU slots (default
        one per CPU)."""
        kinds = dict(gpus_by_type) or {"cpu-slot": slots or cpus}
        return cls(gpus_by_type=kinds, cpus=cpus, memory_bytes=memory_bytes, cpu_slots=not gpus_by_type)

    @property
    def total_gpus(self) -> int:
        return sum(self.gpus_by_type.values())


def _clean(pool: ComputePool) -> None:
    if pool.driver == ComputePool.Driver.RAY and not pool.ray_address:
        raise DomainError(
            "a ray pool needs ray_address (its Job Submission / dashboard URL)", field="ray_address"
        )
    try:
        pool.full_clean()
    except DjangoValidationError as e:
        field, messages = next(iter(e.message_dict.items()))
        raise DomainError(messages[0], field=field) from None


@transaction.atomic
def pool_create(
    *,
    name: str,
    driver: str = "local",
    ray_address: str = "",
    enabled: bool = True,
    labels: dict | None = None,
) -> ComputePool:
    if ComputePool.objects.filter(name=name).exists():
        raise Conflict(f"a pool named {name!r} already exists")
    pool = ComputePool(
        name=name, driver=driver, ray_address=ray_address, enabled=enabled, labels=labels or {}
    )
    _clean(pool)
    pool.save()
    audit_record(
        AuditAction.POOL_CREATED,
        organization=None,
        target=("computepool", pool.pk, pool.name),
        details={
            "driver": pool.driver,
            "ray_address": pool.ray_address,
            "enabled": pool.enabled,
            "labels": pool.labels,
        },
    )
    return pool


@transaction.atomic
def pool_update(*, pool: ComputePool, **changes) -> ComputePool:
    unknown = set(changes) - set(POOL_FIELDS)
    if unknown:
        raise DomainError(f"unknown pool fields: {', '.join(sorted(unknown))}", field=sorted(unknown)[0])
    pool = ComputePool.objects.select_for_update().get(pk=pool.pk)
    before = {field: getattr(pool, field) for field in changes}
    for field, value in changes.items():
        setattr(pool, field, value)
    _clean(pool)
    pool.save()
    changed = {
        f: {"from": before[f], "to": getattr(pool, f)} for f in changes if before[f] != getattr(pool, f)
    }
    if changed:
        audit_record(
            AuditAction.POOL_UPDATED,
            organization=None,
            target=("computepool", pool.pk, pool.name),
            details={"changes": changed},
        )
    return pool


@transaction.atomic
def pool_delete(*, pool: ComputePool) -> None:
    pool = ComputePool.objects.select_for_update().get(pk=pool.pk)
    if Allocation.objects.filter(pool=pool, released_at__isnull=True).exists():
        raise Conflict("the pool still runs jobs; disable it and wait for them to finish")
    Allocation.objects.filter(pool=pool).delete()
    audit_record(
        AuditAction.POOL_DELETED,
        organization=None,
        target=("computepool", pool.pk, pool.name),
        details={"driver": pool.driver},
    )
    pool.delete()


def pool_report(
    *, pool: ComputePool, capacity: PoolCapacity | None, health: str, message: str = ""
) -> ComputePool:
    """A driver's reading of the pool: its capacity (None: unchanged), health and a heartbeat."""
    fields = {"health": health, "health_message": message[:500], "last_heartbeat": timezone.now()}
    if capacity is not None:
        fields.update(
            gpus_by_type=dict(capacity.gpus_by_type),
            total_gpus=capacity.total_gpus,
            cpus=capacity.cpus,
            memory_bytes=capacity.memory_bytes,
            cpu_slots=capacity.cpu_slots,
        )
    ComputePool.objects.filter(pk=pool.pk).update(**fields, updated_at=timezone.now())
    pool.refresh_from_db()
    return pool


def pool_ensure(*, name: str, driver: str = "local", labels: dict | None = None) -> tuple[ComputePool, bool]:
    """Register a pool if it does not exist yet (idempotent; a concurrent call cannot create it twice)."""
    pool, created = ComputePool.objects.get_or_create(
        name=name, defaults={"driver": driver, "labels": labels or {}, "health": ComputePool.Health.UNKNOWN}
    )
    return pool, created
