"""The log context of Celery tasks: each task runs in its own scope naming the task; a task that loads a job
adds the job's id (``context.bind``), so its log lines carry it."""

from __future__ import annotations

import contextvars

from celery.signals import task_postrun, task_prerun

from portal.observability import context

_open: dict[str, contextvars.Token] = {}


@task_prerun.connect
def _task_started(task_id=None, task=None, **_kwargs) -> None:
    if task_id is not None:
        _open[task_id] = context.open_scope(task=getattr(task, "name", ""), task_id=task_id)


@task_postrun.connect
def _task_finished(task_id=None, **_kwargs) -> None:
    token = _open.pop(task_id, None) if task_id is not None else None
    if token is not None:
        context.close_scope(token)
