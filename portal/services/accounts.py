"""Accounts: signing up creates the user and their first organization together (both or neither)."""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import IntegrityError, transaction

from portal.errors import Conflict, DomainError
from portal.models import Organization
from portal.services.orgs import organization_create

MAX_USERNAME = 150


@transaction.atomic
def user_signup(*, username: str, email: str, password: str, org_slug: str, org_name: str):
    """Create a user who owns a new organization; returns (user, organization)."""
    User = get_user_model()
    username = username.strip()
    if not username or len(username) > MAX_USERNAME:
        raise DomainError(f"username must be 1-{MAX_USERNAME} characters", field="username")
    try:
        User.username_validator(username)
    except DjangoValidationError as e:
        raise DomainError(e.messages[0], field="username") from None
    if User.objects.filter(username__iexact=username).exists():
        raise Conflict("that username is taken", field="username")
    candidate = User(username=username, email=email)
    try:
        validate_password(password, user=candidate)
    except DjangoValidationError as e:
        raise DomainError(" ".join(e.messages), field="password") from None
    try:
        with transaction.atomic():
            user = User.objects.create_user(username=username, email=email, password=password)
    except IntegrityError:
        raise Conflict("that username is taken", field="username") from None
    org: Organization = organization_create(slug=org_slug, name=org_name, owner=user)
    return user, org
