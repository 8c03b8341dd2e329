"""The scheduling pass: admit what can start now, on PostgreSQL.

It reads the scheduler's inputs (``portal.scheduling.inputs``: pools, quotas, usage, live allocations, queued
jobs), runs the pure admission policy on them (``portal.scheduling.policy.plan``: quotas, weighted fair
share on decayed usage, priorities, backfill with reservations, borrowing and pool placement) and applies its
decisions: allocations written, jobs moved to ``admitted`` and launched, borrowed allocations asked to
preempt. All inside one transaction holding a transaction-level advisory lock and the pool rows: two passes
at once serialize, so capacity and quotas are never over-admitted however many schedulers run. Once it has
committed, the shared queue explanation (``portal.scheduling.explanation``) is dropped.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime

from django.db import connection, transaction
from django.utils import timezone

from opentinker.spec import JobState
from portal.actors import Actor
from portal.models import Allocation, Job
from portal.observability import counters
from portal.scheduling.explanation import forget_explanation
from portal.scheduling.inputs import plan_at
from portal.scheduling.policy import Wait
from portal.services.enqueue import enqueue
from portal.services.jobs import job_transition
from portal.services.supervision import allocation_preempt_request

SCHEDULER_LOCK = 0x0_7E_5C_4E_D0  # pg advisory lock key: one scheduling pass at a time, cluster-wide


@dataclass
class PassResult:
    admitted: list[object] = field(default_factory=list)  # job ids
    preempted: list[object] = field(default_factory=list)  # allocation ids
    waiting: dict[object, Wait] = field(default_factory=dict)  # job id -> Wait
    seconds: float = 0.0


def schedule_pass(now: datetime | None = None) -> PassResult:
    """Admit what can start now; request preemption of borrowed capacity owners need. Safe to run anywhere,
    any number of times at once."""
    started = time.perf_counter()
    actor = Actor.system("scheduler")
    result = PassResult()
    counted: dict[tuple[str, str], int] = defaultdict(int)  # for /metrics, once the pass has committed
    with transaction.atomic():
        with connection.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", [SCHEDULER_LOCK])
        now = now or timezone.now()
        inputs, decided = plan_at(now, lock=True)
        pool_by_name = {p.name: p for p in inputs.pool_rows}
        used_indices: dict[int, set[int]] = defaultdict(set)
        for pool_id, indices in Allocation.objects.filter(released_at__isnull=True).values_list(
            "pool_id", "gpu_indices"
        ):
            used_indices[pool_id].update(indices or [])
        for adm in decided.admit:
            # The job may have been cancelled since it was read: skip it (its slots stay free this pass).
            job = (
                Job.objects.select_for_update(skip_locked=True)
                .filter(pk=adm.job, state=JobState.QUEUED)
                .first()
            )
            if job is None:
                continue
            pool = pool_by_name[adm.pool]
            indices: list[int] = []
            if adm.gpus and not pool.cpu_slots:
                free = [i for i in range(pool.total_gpus) if i not in used_indices[pool.id]]
                indices = free[: adm.gpus]
                used_indices[pool.id].update(indices)
            alloc = Allocation.objects.create(
                job=job,
                pool=pool,
                attempt=job.attempt,
                gpus=adm.gpus,
                slots=adm.slots,
                cpus=adm.cpus,
                gpu_indices=indices,
                borrowed=adm.borrowed,
            )
            what = f"{adm.gpus} GPUs" if adm.gpus else f"{adm.cpus} CPUs"
            job_transition(
                job=job,
                to=JobState.ADMITTED,
                actor=actor,
                reason=f"admitted to pool {pool.name} ({what}{', borrowed' if adm.borrowed else ''})",
                data={"pool": pool.name, "gpus": adm.gpus, "borrowed": adm.borrowed, "allocation": alloc.pk},
            )
            Job.objects.filter(pk=job.pk).update(pool=pool.name)
            enqueue("workers.launch", alloc.pk, expires=300)
            result.admitted.append(job.pk)
            counted[(counters.ADMISSIONS, pool.name)] += 1
        for alloc_id in decided.preempt:
            alloc = Allocation.objects.select_related("job").get(pk=alloc_id)
            allocation_preempt_request(
                alloc,
                reason="an organization within its nominal GPUs needs this borrowed capacity",
                actor=actor,
            )
            result.preempted.append(alloc_id)
            pool_name = next((p.name for p in inputs.pool_rows if p.pk == alloc.pool_id), "")
            counted[(counters.PREEMPTIONS, pool_name)] += 1
        result.waiting = decided.waiting
    # Committed: the admissions change every wait, so the shared explanation is recomputed on next view.
    forget_explanation()
    counters.count(counted)
    result.seconds = time.perf_counter() - started
    return result
