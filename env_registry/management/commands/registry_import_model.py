"""`python manage.py registry_import_model ORG REPO --name NAME [--revision R] [--mirror DIR]`: copy an
allow-listed Hugging Face Hub repository (HUB_IMPORT_ALLOW) into ORG's model registry
(env_registry/hub_import.py). `--mirror DIR` reads a local mirror (`DIR/<owner>/<name>/`) instead."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from env_registry.hub_import import MirrorFetcher, model_import
from portal.errors import DomainError
from portal.models import Organization


class Command(BaseCommand):
    help = "Import an allow-listed Hugging Face Hub model into an organization's registry."

    def add_arguments(self, parser):
        parser.add_argument("org", help="the organization's slug")
        parser.add_argument("repo", help="owner/name on the Hub")
        parser.add_argument("--name", required=True, help="the model's name in the registry")
        parser.add_argument("--revision", default=None)
        parser.add_argument("--mirror", default=None, help="a local mirror directory instead of the Hub")

    def handle(self, *args, **o):
        org = Organization.objects.filter(slug=o["org"]).first()
        if org is None:
            raise CommandError(f"no organization {o['org']!r}")
        fetcher = MirrorFetcher(o["mirror"]) if o["mirror"] else None
        try:
            version = model_import(
                organization=org,
                user=None,
                repo_id=o["repo"],
                name=o["name"],
                revision=o["revision"],
                fetcher=fetcher,
            )
        except DomainError as e:
            raise CommandError(str(e)) from None
        ref = f"{org.slug}/{version.model.name}@{version.version}"
        self.stdout.write(
            f"imported {o['repo']} as {ref}: {version.status} {version.validation_error}".rstrip()
        )
