"""The scheduler, split along its seams:

- ``policy``: the admission policy, pure (plain dataclasses in, decisions out; no Django): quotas, weighted
  fair share on decayed usage, priorities, backfill with reservations, borrowing, pool placement;
- ``inputs``: the policy's inputs read from PostgreSQL, and the plan made on them;
- ``explanation``: why each queued job waits, from a read-only plan, cached for every viewer.

The pass that applies a plan (locks, allocations, state changes) is the service
``portal.services.scheduler.schedule_pass``. Nothing is imported here, so that ``policy`` loads without
Django.
"""
