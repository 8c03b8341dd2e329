"""The ``ray`` driver: NOT IMPLEMENTED YET.

Planned: submit ``runtime_command() + [spec]`` as a Ray job through Ray's Job Submission API
(``ray.job_submission.JobSubmissionClient(pool.ray_address)``, ``submission_id=f"otk-{job}-{attempt}"`` so a
retried launch is idempotent, ``entrypoint_num_gpus=alloc.gpus``, the job's variables in
``runtime_env["env_vars"]``), follow it with ``get_job_status`` / ``get_job_info().driver_exit_code`` from the
supervisor pass, stop it with ``stop_job`` on cancel or preemption, and read capacity from its nodes.

Until then a ray pool reports itself ``down`` (the supervisor's pool refresh calls ``capacity()``), so the
scheduler never places a job on it.
"""

from __future__ import annotations

from portal.models import Allocation, ComputePool


class RayDriver:
    def __init__(self, pool: ComputePool) -> None:
        self.pool = pool

    def capacity(self) -> dict:
        raise RuntimeError("the ray driver is not implemented yet; this pool admits no jobs")

    def launch(self, alloc: Allocation, work_dir, spec_path, env: dict[str, str]) -> tuple[str, str]:
        raise RuntimeError("the ray driver is not implemented yet")

    def stop(self, alloc: Allocation, *, grace_s: float = 0) -> bool:
        return False

    def kill(self, alloc: Allocation) -> bool:
        return False

    def alive(self, alloc: Allocation) -> bool | None:
        return None

    def follow(self, alloc: Allocation) -> bool:
        return False
