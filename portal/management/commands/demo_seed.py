"""Create (or refresh) the demo organization, its staff user and a CLI token for `make demo`."""

from __future__ import annotations

import json
import secrets

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import transaction

from portal.models import Membership, Organization, Role
from portal.services.orgs import organization_create
from portal.services.tokens import token_create

DEMO_USER = "demo"
DEMO_ORG = "demo"
TOKEN_NAME = "demo-cli"  # noqa: S105 (a label, not a secret)


class Command(BaseCommand):
    help = "Create the demo organization and user; print the login and a fresh API token as JSON."

    @transaction.atomic
    def handle(self, *args, **options):
        User = get_user_model()
        # The password is kept under var/ so the login printed last time keeps working after a restart.
        password_file = settings.VAR_DIR / "demo-password"
        if password_file.exists():
            password = password_file.read_text().strip()
        else:
            password = secrets.token_urlsafe(12)
            password_file.write_text(password)
            password_file.chmod(0o600)
        user, _ = User.objects.get_or_create(username=DEMO_USER, defaults={"email": "demo@example.com"})
        user.set_password(password)
        # Staff, so the demo also shows the admin console and the quota API.
        user.is_staff = user.is_superuser = True
        user.save()
        org = Organization.objects.filter(slug=DEMO_ORG).first()
        if org is None:
            org = organization_create(slug=DEMO_ORG, name="Demo", owner=user)
        membership = Membership.objects.select_related("user", "organization").get(
            organization=org, user=user
        )
        if membership.role != Role.OWNER:
            membership.role = Role.OWNER
            membership.save(update_fields=["role"])
        # One live demo token at a time: the previous run's secret was printed, so retire it.
        from django.utils import timezone

        user.api_tokens.filter(name=TOKEN_NAME, revoked_at__isnull=True).update(revoked_at=timezone.now())
        _, secret = token_create(
            membership=membership,
            name=TOKEN_NAME,
            scopes=["jobs:read", "jobs:write", "envs:read", "envs:write", "org:admin"],
            expires_in_days=30,
        )
        self.stdout.write(
            json.dumps(
                {"username": DEMO_USER, "password": password, "token": secret, "organization": org.slug}
            )
        )
