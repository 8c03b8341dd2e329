"""Who calls the Tinker API.

The SDK sends `X-API-Key` and refuses, before sending anything, a key that does not start with `tml-`. An
organization's API token `otk_...` is therefore presented as `tml-otk_...`: the prefix is dropped and the rest
checked like any API token (portal.services.tokens); it must hold the `tinker` scope (else 403). The model
server authenticates its ingest with its own token (`server_tokens`), never with a user's.
"""

from __future__ import annotations

from django.http import HttpRequest

from api.tinker.server_tokens import model_server_token_verify
from portal.models import Membership, Scope
from portal.services.tokens import token_authenticate, token_effective_scopes

SDK_PREFIX = "tml-"
MAX_KEY = 200
INVALID = "invalid, expired or revoked API key (use tml-<your otk_ token>)"


class TinkerAuthError(Exception):
    def __init__(self, message: str, status: int = 401) -> None:
        super().__init__(message)
        self.status = status


def sdk_key(token: str) -> str:
    """How an API token is written for the tinker SDK (TINKER_API_KEY)."""
    return f"{SDK_PREFIX}{token}"


def authenticate(request: HttpRequest) -> Membership:
    raw = request.headers.get("X-API-Key", "")
    if not raw.startswith(SDK_PREFIX) or len(raw) > MAX_KEY:
        raise TinkerAuthError(INVALID)
    found = token_authenticate(raw.removeprefix(SDK_PREFIX))
    if found is None:
        raise TinkerAuthError(INVALID)
    token, membership = found
    if Scope.TINKER not in token_effective_scopes(token, membership):
        raise TinkerAuthError(f"this token lacks the {Scope.TINKER.value!r} scope", status=403)
    return membership


def authenticate_model_server(request: HttpRequest) -> str | None:
    """The base model whose server sent the request, or None."""
    scheme, _, raw = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return model_server_token_verify(raw.strip())
