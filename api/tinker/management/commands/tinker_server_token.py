"""`manage.py tinker_server_token BASE [--ttl-days N]`: a model-server token for one base model's server
(OPENTINKER_MODEL_SERVER_TOKEN of `python -m gpu_runtime.model_server serve`), printed alone on stdout."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from api.tinker.server_tokens import MAX_TTL_DAYS, model_server_token_issue
from opentinker.spec import MODEL_PRESETS


class Command(BaseCommand):
    help = "Print a model-server token for the Tinker API's ingest, good for one base model's futures."

    def add_arguments(self, parser):
        parser.add_argument("base_model")
        parser.add_argument("--ttl-days", type=int, default=7)

    def handle(self, *args, base_model: str, ttl_days: int, **options):
        if base_model not in MODEL_PRESETS:
            known = ", ".join(sorted(MODEL_PRESETS))
            raise CommandError(f"unknown base model {base_model!r}; known: {known}")
        if not 1 <= ttl_days <= MAX_TTL_DAYS:
            raise CommandError(f"--ttl-days must be in [1, {MAX_TTL_DAYS}]: mint a new one before it expires")
        self.stdout.write(model_server_token_issue(base_model, ttl=ttl_days * 86400))
