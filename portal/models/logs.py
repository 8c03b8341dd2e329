"""Log lines of a job's runtime (stdout/stderr), numbered per job."""

from __future__ import annotations

from django.db import models

from portal.models.jobs import Job


class JobLog(models.Model):
    id = models.BigAutoField(primary_key=True)
    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="logs")
    seq = models.PositiveIntegerField()
    stream = models.CharField(max_length=10, default="stdout")
    line = models.CharField(max_length=4000)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["job", "seq"]
        constraints = [models.UniqueConstraint(fields=["job", "seq"], name="uniq_job_log_seq")]

    def __str__(self) -> str:
        return f"{self.job_id} #{self.seq} {self.stream}"
