"""The Celery app object. Tasks live in ``workers/``; domain code enqueues them by name."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")

app = Celery("opentinker")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["workers"])

# Each task's log lines carry its name and id, and the job's id once the task binds it.
from portal.observability import tasks as _log_context  # noqa: E402, F401
