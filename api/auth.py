"""`Authorization: Bearer otk_...` authentication for programs."""

from __future__ import annotations

from rest_framework import authentication, exceptions

from api.tenancy import TokenAuth
from portal.services.token_cache import token_authenticate_cached

MAX_HEADER = 200


class ApiTokenAuthentication(authentication.BaseAuthentication):
    keyword = "Bearer"

    def authenticate(self, request):
        header = request.META.get("HTTP_AUTHORIZATION", "")
        if not header:
            return None
        scheme, _, raw = header.partition(" ")
        if scheme.lower() not in ("bearer", "token"):
            return None
        raw = raw.strip()
        # One message for every kind of bad token: never tell a caller which part was wrong.
        if len(raw) > MAX_HEADER:
            raise exceptions.AuthenticationFailed("invalid, expired or revoked token")
        found = token_authenticate_cached(raw)
        if found is None:
            raise exceptions.AuthenticationFailed("invalid, expired or revoked token")
        token, membership = found
        return token.user, TokenAuth(token=token, membership=membership)

    def authenticate_header(self, request) -> str:
        # Makes DRF answer 401 (not 403) to unauthenticated requests.
        return self.keyword
