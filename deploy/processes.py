"""The platform's processes: one image, one command per role. The single list every deployment file uses.

deploy/docker/platform.Dockerfile's CMD is `web`; deploy/compose.yaml and the Helm chart's templates give
each service its role's command; tests/deploy/test_files.py checks that all of them say exactly this, and
tests/deploy/test_production_smoke.py starts these very commands (with this machine's Python for `python`).
"""

from __future__ import annotations

# Beat's schedule file holds only when each periodic task last ran: losing it costs one early pass, so it
# lives in /tmp (writable for the image's non-root user and on a read-only root file system).
BEAT_SCHEDULE = "/tmp/celerybeat-schedule"  # noqa: S108

PROCESSES: dict[str, list[str]] = {
    # One-shot, before anything else of a new version starts (README "Upgrade" in deploy/RUNBOOK.md).
    "migrate": ["python", "manage.py", "migrate", "--noinput"],
    # uvicorn workers, per-process connection pools, metrics directory (deploy/web.py).
    "web": ["python", "deploy/web.py"],
    # Tasks: scheduling, launches, supervision, pool refresh, environment validation.
    "worker": [
        "python", "-m", "celery", "-A", "portal", "worker",
        "--loglevel=INFO", "--without-gossip", "--without-mingle",
    ],
    # Exactly one per installation: it publishes the periodic passes.
    "beat": [
        "python", "-m", "celery", "-A", "portal", "beat",
        "--loglevel=INFO", f"--schedule={BEAT_SCHEDULE}",
    ],
}  # fmt: skip

# The GPU image (deploy/docker/gpu.Dockerfile, compose's ray-head and ray-worker). On Kubernetes the KubeRay
# operator starts Ray itself from the RayCluster's rayStartParams.
RAY_PROCESSES: dict[str, list[str]] = {
    "ray-head": [
        "ray", "start", "--head", "--port=6379", "--dashboard-host=0.0.0.0", "--dashboard-port=8265",
        "--num-gpus=0", "--block",
    ],
    "ray-worker": ["ray", "start", "--address=ray-head:6379", "--block"],
}  # fmt: skip
