"""The ``ray`` driver: the runtime as a Ray job, through Ray's Job Submission API, on the pool's cluster.

- **launch** submits ``runtime command + spec.json`` with ``submission_id = otk-<job>-<attempt>``: a retried
  launch finds its own submission instead of starting a second one. The job's variables (ingest URL, job
  token, checkpoint prefix, resume point) travel in ``runtime_env["env_vars"]`` and the spec in the uploaded
  ``working_dir`` (the attempt's work directory), so the cluster needs no shared disk with the platform.
  A job takes ``entrypoint_num_gpus`` GPUs (one CPU on a CPU-only cluster, where a slot is a CPU).
- **follow** (every supervisor pass): a live submission heartbeats its allocation; a finished one reports its
  outcome (``driver_exit_code``; a submission that failed without one, e.g. its node died, is a lost
  runtime, re-queued); a cancelled job or a preempted allocation is stopped (``stop_job``: SIGTERM, the
  runtime checkpoints at its next step boundary, SIGKILL after ``OPENTINKER_STOP_GRACE_S``).
- **capacity** is read from the cluster's alive nodes (GPUs by accelerator type, or CPU slots without GPUs).

The runtime inside a Ray job needs no Ray of its own for one trainer rank (``gpu_runtime`` runs in process);
with more ranks it joins this cluster through the ``RAY_ADDRESS`` that Ray sets for every job.
"""

from __future__ import annotations

import json
import logging
import os
import shlex

from django.conf import settings

from portal.models import Allocation, ComputePool, Job
from workers.drivers import capacity_report

logger = logging.getLogger(__name__)

LIVE = {"PENDING", "RUNNING"}


def ray_runtime_command() -> list[str]:
    """What the cluster runs (its own Python, not this worker's): ``OPENTINKER_RAY_RUNTIME_COMMAND``."""
    from_env = os.environ.get("OPENTINKER_RAY_RUNTIME_COMMAND")
    configured = (
        json.loads(from_env) if from_env else getattr(settings, "OPENTINKER_RAY_RUNTIME_COMMAND", None)
    )
    return [str(x) for x in configured] if configured else ["python", "-m", "gpu_runtime", "run"]


def submission_id(alloc: Allocation) -> str:
    return f"otk-{alloc.job_id}-{alloc.attempt}"


def _grace_s() -> int:
    return int(
        float(os.environ.get("OPENTINKER_STOP_GRACE_S") or getattr(settings, "OPENTINKER_STOP_GRACE_S", 30))
    )


class RayDriver:
    def __init__(self, pool: ComputePool) -> None:
        self.pool = pool
        self._client = None

    @property
    def client(self):
        if self._client is None:
            # Imported here: only workers that drive a Ray pool pay for importing Ray.
            from ray.job_submission import JobSubmissionClient

            self._client = JobSubmissionClient(self.pool.ray_address)
        return self._client

    def capacity(self) -> dict:
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
        return capacity_report(gpus, cpus, memory)

    def launch(self, alloc: Allocation, work_dir, spec_path, env: dict[str, str]) -> tuple[str, str]:
        """Submit the job (idempotent per attempt); returns (submission id, cluster address)."""
        sid = submission_id(alloc)
        env_vars = {**env, "RAY_JOB_STOP_WAIT_TIME_S": str(_grace_s()), "PYTHONUNBUFFERED": "1"}
        extra = getattr(settings, "OPENTINKER_RAY_ENV_VARS", None) or {}
        env_vars.update({str(k): str(v) for k, v in extra.items()})
        if alloc.pool.cpu_slots:
            env_vars["CUDA_VISIBLE_DEVICES"] = ""
        try:
            self.client.submit_job(
                entrypoint=shlex.join([*ray_runtime_command(), spec_path.name]),
                submission_id=sid,
                runtime_env={"working_dir": str(work_dir), "env_vars": env_vars},
                entrypoint_num_gpus=0 if alloc.pool.cpu_slots else alloc.gpus,
                entrypoint_num_cpus=1 if alloc.pool.cpu_slots else 0,
                metadata={"opentinker_job": str(alloc.job_id), "attempt": str(alloc.attempt)},
            )
        except Exception as e:
            # Submitted by an earlier try of this launch (the id is taken): that submission is ours.
            try:
                self.client.get_job_status(sid)
            except Exception:
                raise e from None
            logger.info("ray job %s was already submitted", sid)
        return sid, self.pool.ray_address

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
        """One supervisor look at the submission. Returns True when its outcome was recorded."""
        from portal.services.supervision import allocation_heartbeat, job_log_append, job_process_exited

        try:
            info = self.client.get_job_info(alloc.runtime_handle)
        except Exception:
            # The cluster is away: no heartbeat, so the supervisor reaps it after the heartbeat timeout.
            logger.warning("ray job %s: no answer from %s", alloc.runtime_handle, self.pool.ray_address)
            return False
        status = str(info.status)
        if status in LIVE:
            allocation_heartbeat(alloc.pk)
            state = Job.objects.filter(pk=alloc.job_id).values_list("state", flat=True).first()
            row = Allocation.objects.filter(pk=alloc.pk).values("preempt_requested_at", "released_at").first()
            stop = state == "cancelling" or row is None or row["preempt_requested_at"] is not None
            if stop:  # repeated each pass: Ray keeps the first stop's grace period
                self.stop(alloc)
            return False
        tail = self._log_tail(alloc)
        if tail:
            job_log_append(job_id=alloc.job_id, lines=[("stdout", line) for line in tail])
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

    def _log_tail(self, alloc: Allocation, lines: int = 200) -> list[str]:
        try:
            return self.client.get_job_logs(alloc.runtime_handle).splitlines()[-lines:]
        except Exception:
            return []
