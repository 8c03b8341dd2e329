"""The ``ray`` driver: the runtime as a Ray job, through Ray's Job Submission API, on the pool's cluster.

- **launch** submits ``runtime command + spec.json`` with ``submission_id = otk-<job>-<attempt>``: a retried
  launch finds its own submission instead of starting a second one. The job's variables (ingest URL,
  checkpoint prefix, resume point) travel in ``runtime_env["env_vars"]`` and the spec in the uploaded
  ``working_dir`` (the attempt's work directory), so the cluster needs no shared disk with the platform.
  Both are readable by anyone with the cluster's Job API, so no secret goes there: the job token and the
  environment secret are fetched by the runtime at start with a single-use, short-lived bootstrap token
  (portal/services/job_bootstrap.py, gpu_runtime/bootstrap.py).
  A job takes ``entrypoint_num_gpus`` GPUs (one CPU on a CPU-only cluster, where a slot is a CPU); with
  ``resources.trainer_ranks`` or ``resources.rollout_workers`` > 1 its placement group takes them instead, the
  entrypoint a token CPU share.
- **follow** (every supervisor pass): copies the log lines the job printed since the last pass into the job's
  log (``Allocation.log_offset`` remembers how far; at most ``LOG_LINES_PER_PASS`` lines a pass, so a
  finished job with more left is drained over the next passes before its outcome is recorded); a live
  submission heartbeats its allocation; a finished one reports its
  outcome (``driver_exit_code``; a submission that failed without one, e.g. its node died, is a lost
  runtime, re-queued); a cancelled job or a preempted allocation is stopped (``stop_job``: SIGTERM, the
  runtime checkpoints at its next step boundary, SIGKILL after ``OPENTINKER_STOP_GRACE_S``).
- **capacity** is read from the cluster's alive nodes (GPUs by accelerator type, or CPU slots without GPUs).

The runtime inside a Ray job needs no Ray of its own for one trainer rank and one rollout worker
(``gpu_runtime`` runs in process); with ``resources.trainer_ranks`` or ``resources.rollout_workers`` > 1 it
joins this cluster through the ``RAY_ADDRESS`` that Ray sets for every job and places its actors there
(``resources.placement``: packed or spread over the nodes; the ranks meet at rank 0's node address,
``gpu_runtime/placement.py``).
"""

from __future__ import annotations

import json
import logging
import re
import shlex
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import transaction

from portal.models import Allocation, ComputePool, Job
from portal.services.job_bootstrap import BOOTSTRAP_VAR, bootstrap_issue
from portal.services.pools import PoolCapacity
from portal.services.supervision import allocation_heartbeat, job_log_append, job_process_exited
from workers.drivers.base import Driver, Launched

logger = logging.getLogger(__name__)

LIVE = {"PENDING", "RUNNING"}
# Never in a Ray job's runtime_env (the runtime gets them by redeeming its bootstrap token).
# A Tinker model server's token and queue URL (which may carry Valkey's password) come the same way.
SECRET_VARS = frozenset(
    {"OPENTINKER_JOB_TOKEN", "OPENTINKER_ENV_SECRET", "OPENTINKER_MODEL_SERVER_TOKEN", "OPENTINKER_QUEUE_URL"}
)
# What one supervisor pass copies of a job's log at most; the rest waits for the next pass.
LOG_LINES_PER_PASS = 2000
LOG_CHARS_PER_PASS = 1_000_000
LOG_DETAIL_CHARS = 20_000  # the end of the log the failure detail is taken from


def ray_runtime_command() -> list[str]:
    """What the cluster runs (its own Python, not this worker's): ``OPENTINKER_RAY_RUNTIME_COMMAND``."""
    configured = settings.OPENTINKER_RAY_RUNTIME_COMMAND
    return [str(x) for x in configured] if configured else ["python", "-m", "gpu_runtime", "run"]


# What the entrypoint holds when the runtime places its actors in a placement group of its own: a token CPU
# share (Ray needs some to schedule it), no GPU, so the job's resources are not claimed twice.
ENTRYPOINT_CPU_TOKEN = 0.01


def entrypoint_resources(spec: dict[str, Any], alloc: Allocation) -> dict[str, float]:
    """`entrypoint_num_cpus`/`_gpus` of the job. In process (one trainer rank, one rollout worker) the
    entrypoint runs everything and holds the job's GPUs (or its CPU slot); with `trainer_ranks` or
    `rollout_workers` > 1 the runtime's placement group takes exactly the admitted resources
    (gpu_runtime/placement.py), and the entrypoint (the controller only) holds a token share: both holding
    them would need twice the GPUs the scheduler admitted, and the placement group would time out or take
    others' GPUs."""
    resources = spec.get("resources") or {}
    if int(resources.get("rollout_workers", 1)) > 1 or int(resources.get("trainer_ranks", 1)) > 1:
        return {"entrypoint_num_cpus": ENTRYPOINT_CPU_TOKEN, "entrypoint_num_gpus": 0}
    if alloc.pool.cpu_slots:
        return {"entrypoint_num_cpus": 1, "entrypoint_num_gpus": 0}
    return {"entrypoint_num_cpus": 0, "entrypoint_num_gpus": alloc.gpus}


# A `NAME=value` word: to the shell, an environment assignment when it leads the command.
_ASSIGNMENT = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=(.*)", re.DOTALL)


def entrypoint(spec_path: Path) -> str:
    """The Ray job's shell command. `exec`: Ray runs it through `/bin/sh -c`, and a shell that waits for the
    runtime turns its death by a signal into exit code 128 + n, a failure; exec'd, the runtime is Ray's child
    and a kill shows as one (negative exit code): the job is re-queued as lost, as on a local pool.
    `NAME=value` words leading the configured command stay environment assignments, before `exec` (after
    it, the shell would look for a program named `NAME=value`)."""
    words = [*ray_runtime_command(), spec_path.name]
    assignments: list[str] = []
    while len(words) > 1 and (m := _ASSIGNMENT.fullmatch(words[0])):
        assignments.append(f"{m[1]}={shlex.quote(m[2])}")
        words.pop(0)
    return " ".join([*assignments, "exec", shlex.join(words)])


def submission_id(alloc: Allocation) -> str:
    return f"otk-{alloc.job_id}-{alloc.attempt}"


def _grace_s() -> int:
    return int(settings.OPENTINKER_STOP_GRACE_S)


class RayDriver(Driver):
    # The supervisor is the Ray job's runner (``follow``): a silent allocation means the cluster is away.
    lost_detail = "ray cluster not answering"

    def __init__(self, pool: ComputePool) -> None:
        super().__init__(pool)
        self._client = None

    @property
    def client(self):
        if self._client is None:
            # Imported here: only workers that drive a Ray pool pay for importing Ray.
            from ray.job_submission import JobSubmissionClient

            self._client = JobSubmissionClient(self.pool.ray_address)
        return self._client

    def capacity(self) -> PoolCapacity:
        """GPUs by type from the alive nodes' resources; without GPUs, one slot per CPU."""
        from ray.util.state import list_nodes

        nodes = [n for n in list_nodes(address=self.pool.ray_address, limit=10_000) if n.state == "ALIVE"]
        if not nodes:
            raise RuntimeError("the Ray cluster has no alive node")
        gpus: dict[str, int] = {}
        cpus = memory = 0
        for n in nodes:
            res = n.resources_total or {}
            cpus += int(res.get("CPU", 0))
            memory += int(res.get("memory", 0))
            if res.get("GPU"):
                kind = next((k.split(":", 1)[1] for k in res if k.startswith("accelerator_type:")), "GPU")
                gpus[kind] = gpus.get(kind, 0) + int(res["GPU"])
        return PoolCapacity.measured(gpus, cpus, memory)

    def launch(self, alloc: Allocation, work_dir: Path, spec_path: Path, env: dict[str, str]) -> Launched:
        """Submit the job (idempotent per attempt); its handle is the submission id, on the cluster's
        address."""
        sid = submission_id(alloc)
        if self._submitted(sid):  # an earlier try of this launch got through: that submission is ours
            logger.info("ray job %s was already submitted", sid)
            return Launched(handle=sid, host=self.pool.ray_address)
        # The runtime_env is readable by anyone with this cluster's Job API: no secret goes into it, only a
        # single-use, short-lived bootstrap token the runtime redeems for them at start.
        env_vars = {k: v for k, v in env.items() if k not in SECRET_VARS}
        env_vars[BOOTSTRAP_VAR] = bootstrap_issue(alloc)
        env_vars.update({"RAY_JOB_STOP_WAIT_TIME_S": str(_grace_s()), "PYTHONUNBUFFERED": "1"})
        extra = settings.OPENTINKER_RAY_ENV_VARS
        env_vars.update({str(k): str(v) for k, v in extra.items()})
        if alloc.pool.cpu_slots:
            env_vars["CUDA_VISIBLE_DEVICES"] = ""
        try:
            self.client.submit_job(
                entrypoint=entrypoint(spec_path),
                submission_id=sid,
                runtime_env={"working_dir": str(work_dir), "env_vars": env_vars},
                **entrypoint_resources(json.loads(spec_path.read_text()), alloc),
                metadata={"opentinker_job": str(alloc.job_id), "attempt": str(alloc.attempt)},
            )
        except Exception as e:
            # Submitted meanwhile by a racing try of this launch (the id is taken): that submission is ours.
            if not self._submitted(sid):
                raise e from None
            logger.info("ray job %s was already submitted", sid)
        return Launched(handle=sid, host=self.pool.ray_address)

    def _submitted(self, sid: str) -> bool:
        try:
            self.client.get_job_status(sid)
        except Exception:
            return False
        return True

    def stop(self, alloc: Allocation, *, grace_s: float = 0) -> bool:
        """SIGTERM the job (it checkpoints and exits); Ray SIGKILLs it after the grace period."""
        if not alloc.runtime_handle.startswith("otk-"):
            return False
        try:
            return bool(self.client.stop_job(alloc.runtime_handle))
        except Exception:
            logger.warning("could not stop ray job %s", alloc.runtime_handle, exc_info=True)
            return False

    kill = stop  # the reaper's kill: Ray's stop ends with SIGKILL after the grace period

    def alive(self, alloc: Allocation) -> bool | None:
        try:
            return str(self.client.get_job_status(alloc.runtime_handle)) in LIVE
        except Exception:
            return None  # the cluster cannot be asked now

    def follow(self, alloc: Allocation) -> bool:
        """One supervisor look at the submission. Returns True when its outcome was recorded; otherwise
        ``alloc.heartbeat_at`` is read again (this look may have moved it)."""
        if self._look(alloc):
            return True
        alloc.refresh_from_db(fields=["heartbeat_at"])
        return False

    def _look(self, alloc: Allocation) -> bool:
        try:
            info = self.client.get_job_info(alloc.runtime_handle)
        except Exception:
            # The cluster is away: no heartbeat, so the supervisor reaps it after the heartbeat timeout.
            logger.warning("ray job %s: no answer from %s", alloc.runtime_handle, self.pool.ray_address)
            return False
        status = str(info.status)
        live = status in LIVE
        drained, tail = self._copy_logs(alloc, final=not live)
        if live or not drained:
            # Still running, or finished with log lines left to copy: alive for the reaper either way.
            allocation_heartbeat(alloc.pk)
        if live:
            state = Job.objects.filter(pk=alloc.job_id).values_list("state", flat=True).first()
            row = Allocation.objects.filter(pk=alloc.pk).values("preempt_requested_at", "released_at").first()
            stop = state == "cancelling" or row is None or row["preempt_requested_at"] is not None
            if stop:  # repeated each pass: Ray keeps the first stop's grace period
                self.stop(alloc)
            return False
        if not drained:
            return False
        if status == "SUCCEEDED":
            code = 0
        elif status == "STOPPED":
            code = info.driver_exit_code if info.driver_exit_code is not None else -15
        else:  # FAILED: the runtime's exit code, or none when the runtime or its node was lost
            code = info.driver_exit_code
        detail = "\n".join(tail[-20:]) if code else ""
        if code is None and info.message:
            detail = info.message
        job_process_exited(allocation_id=alloc.pk, exit_code=code, detail=detail)
        return True

    def _copy_logs(self, alloc: Allocation, *, final: bool) -> tuple[bool, list[str]]:
        """Append the job's log lines after ``alloc.log_offset`` to its JobLog; returns (all copied, the log's
        last lines). While the job runs only complete lines are taken (a half-written one waits for its
        newline); once it has ended, the last line too. Several supervisor passes may race: the offset is
        read and moved under the allocation's row lock, after the log was fetched, so a pass holding an
        older, shorter copy of the log finds nothing new and no line is copied twice."""

        try:
            # The Job API serves only the whole log; what is new is cut from it here.
            text = self.client.get_job_logs(alloc.runtime_handle) or ""
        except Exception:
            logger.warning("ray job %s: could not read its log", alloc.runtime_handle, exc_info=True)
            return True, []  # the outcome is not held back by a log that cannot be read
        tail = text[-LOG_DETAIL_CHARS:].splitlines()
        if len(text) <= alloc.log_offset:  # nothing new since this pass's view of the offset: no row lock
            return True, tail
        with transaction.atomic():
            row = (
                Allocation.objects.select_for_update(skip_locked=True)
                .filter(pk=alloc.pk)
                .values_list("log_offset", flat=True)
                .first()
            )
            if row is None:  # another pass is copying right now (or the row is gone): next pass
                return False, tail
            offset = row
            new = text[offset:]
            if not final:
                new = new[: new.rfind("\n") + 1]  # complete lines only
            lines = new.splitlines(keepends=True)
            taken = lines[:LOG_LINES_PER_PASS]
            size = 0
            for i, line in enumerate(taken):  # and at most LOG_CHARS_PER_PASS characters (one line at least)
                size += len(line)
                if size > LOG_CHARS_PER_PASS and i:
                    taken = taken[:i]
                    break
            if taken:
                job_log_append(job_id=alloc.job_id, lines=[("stdout", ln.rstrip("\r\n")) for ln in taken])
                Allocation.objects.filter(pk=alloc.pk).update(log_offset=offset + sum(map(len, taken)))
            return len(taken) == len(lines), tail
