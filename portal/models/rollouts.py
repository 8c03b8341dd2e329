"""Episodes a job's runtime recorded for reading (gpu_runtime.rollout_log): one row per (job, step)."""

from __future__ import annotations

from django.db import models

from portal.models.jobs import Job


class RolloutStep(models.Model):
    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="rollout_steps")
    step = models.PositiveIntegerField()
    episodes = models.JSONField(default=list, help_text="The step's recorded episodes, best and worst first.")
    size_bytes = models.PositiveIntegerField(default=0, help_text="The episodes' size as JSON.")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["job", "step"]
        constraints = [models.UniqueConstraint(fields=["job", "step"], name="uniq_rollout_step")]

    def __str__(self) -> str:
        return f"rollouts of {self.job_id} at step {self.step}"
