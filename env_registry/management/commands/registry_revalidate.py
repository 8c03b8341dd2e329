"""`python manage.py registry_revalidate [--org SLUG]`: validate again the model versions left pending (a
check that ended without a verdict for a reason not the model's, after the task's retries ran out): each is
validated here, or enqueued with ENV_VALIDATION_MODE=celery. Valid and invalid versions stay as they are."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from env_registry.model_registry import model_validation_start
from env_registry.models import ModelVersion, ValidationStatus
from portal.models import Organization


class Command(BaseCommand):
    help = "Validate again the registry's model versions that are still pending."

    def add_arguments(self, parser):
        parser.add_argument("--org", default=None, help="only this organization's (its slug)")

    def handle(self, *args, **o):
        pending = ModelVersion.objects.filter(status=ValidationStatus.PENDING).select_related(
            "model__organization"
        )
        if o["org"]:
            if not Organization.objects.filter(slug=o["org"]).exists():
                raise CommandError(f"no organization {o['org']!r}")
            pending = pending.filter(model__organization__slug=o["org"])
        for version in pending.order_by("pk"):
            model_validation_start(version)
            ref = f"{version.model.organization.slug}/{version.model.name}@{version.version}"
            why = f" ({version.validation_error})" if version.validation_error else ""
            self.stdout.write(f"{ref}: {version.status}{why}")
