"""Sending Celery tasks by name from domain code, which never imports `workers`."""

from __future__ import annotations

from django.db import transaction

from portal.celery import app


def enqueue(task_name: str, *args, **options) -> None:
    """Send a Celery task by name once the transaction commits."""

    def send() -> None:
        app.send_task(task_name, args=list(args), **options)

    # robust: a broker that is down must not turn a committed change into an error; beat repeats the work.
    transaction.on_commit(send, robust=True)
