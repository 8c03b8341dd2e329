"""Celery tasks (scheduler, launcher, supervisor, reaper, usage).

The Celery app object is portal.celery.app.
"""
