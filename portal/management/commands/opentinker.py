"""``manage.py opentinker up|down|status``: the embedded PostgreSQL and Valkey servers under VAR_DIR."""

from __future__ import annotations

import json
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from portal.embedded import EmbeddedServiceError, EmbeddedServices


class Command(BaseCommand):
    help = "Start (up), stop (down) or inspect (status) the embedded PostgreSQL and Valkey servers."
    # infrastructure: must work before the database exists, so no system checks
    requires_system_checks: list[str] = []

    def add_arguments(self, parser):
        parser.add_argument("action", choices=["up", "down", "status"])
        parser.add_argument("--fast", action="store_true", help="no fsync: for throwaway data only")

    def handle(self, *args, action: str, fast: bool, **options):
        base = Path(getattr(settings, "BASE_DIR", Path(__file__).resolve().parents[3]))
        services = EmbeddedServices(Path(getattr(settings, "VAR_DIR", base / "var")), fast=fast)
        try:
            if action == "up":
                urls = services.start()
                for key, value in urls.as_env().items():
                    self.stdout.write(f"{key}={value}")
                self.stdout.write(self.style.SUCCESS(f"services running; URLs in {services.urls_file}"))
            elif action == "down":
                services.stop()
                self.stdout.write(self.style.SUCCESS(f"services under {services.root} stopped"))
            else:
                self.stdout.write(json.dumps(services.status(), indent=2))
        except EmbeddedServiceError as exc:
            raise CommandError(str(exc)) from exc
