"""`manage.py pool_register NAME --ray-address URL`: register a Ray cluster as a pool of the `ray` driver, or
update the address and labels of the pool of that name. Idempotent, so deployment hooks (the Helm chart's
pool registration Job, deploy/RUNBOOK.md's "Adding a GPU pool") run it on every install and upgrade."""

from __future__ import annotations

import json

from django.core.management.base import BaseCommand, CommandError

from portal.errors import DomainError
from portal.models import ComputePool
from portal.services.pools import pool_create, pool_update


class Command(BaseCommand):
    help = "Register (or update) a Ray cluster as a pool of the ray driver."

    def add_arguments(self, parser):
        parser.add_argument("name", help="the pool's name (lower-case letters, digits, dashes)")
        parser.add_argument("--ray-address", required=True, help="its Ray dashboard / Job Submission URL")
        parser.add_argument("--labels", default="{}", help='a JSON object of strings, e.g. {"gpu": "H100"}')
        parser.add_argument("--disabled", action="store_true", help="registered, but admitting no job")

    def handle(self, *args, name: str, ray_address: str, labels: str, disabled: bool, **options):
        try:
            parsed = json.loads(labels)
        except ValueError as exc:
            raise CommandError(f"--labels: not JSON ({exc})") from None
        if not isinstance(parsed, dict) or not all(isinstance(v, str) for v in parsed.values()):
            raise CommandError("--labels: expected a JSON object of strings")
        fields = {"ray_address": ray_address, "labels": parsed, "enabled": not disabled}
        existing = ComputePool.objects.filter(name=name).first()
        try:
            if existing is None:
                pool_create(name=name, driver=ComputePool.Driver.RAY, **fields)
                verb = "registered"
            elif existing.driver != ComputePool.Driver.RAY:
                raise CommandError(f"pool {name!r} exists with the {existing.driver} driver, not ray")
            else:
                pool_update(pool=existing, **fields)
                verb = "updated"
        except DomainError as exc:
            raise CommandError(f"{exc.field or 'pool'}: {exc}") from None
        self.stdout.write(f"pool {name} {verb}: ray at {ray_address}")
