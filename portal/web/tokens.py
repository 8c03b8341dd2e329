"""API tokens: create (the secret shown once, never stored), list, show, revoke.

The secret is shown once. With htmx the create response is a fragment swapped into the page, so reloading
the page (a GET) never shows it again. Without JavaScript, post/redirect/get: the POST answers 303 to the
page (reloading it never re-POSTs the form), and the secret waits in the session for exactly one GET, which
shows it (no-store) and drops it. It waits there encrypted (Fernet, a key derived from SECRET_KEY, so the
session table alone does not reveal it) and for at most ONCE_TTL_S; it is never in a URL.
"""

from __future__ import annotations

from cryptography.fernet import Fernet, InvalidToken
from django import forms
from django.contrib import messages
from django.shortcuts import redirect, render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_http_methods, require_POST

from portal.errors import DomainError
from portal.models import Scope
from portal.selectors.orgs import token_get, token_list
from portal.services.secrets import fernet
from portal.services.tokens import MAX_EXPIRY_DAYS, token_create, token_revoke
from portal.web.forms import add_domain_error
from portal.web.tenancy import org_page, page_scopes

EXPIRY_CHOICES = [
    ("30", "30 days"),
    ("7", "7 days"),
    ("90", "90 days"),
    (str(MAX_EXPIRY_DAYS), "1 year"),
    ("", "Never"),
]


class TokenForm(forms.Form):
    name = forms.CharField(max_length=100, help_text="What uses it, e.g. “ci” or “laptop”.")
    scopes = forms.MultipleChoiceField(widget=forms.CheckboxSelectMultiple, choices=())
    expires_in_days = forms.ChoiceField(label="Expires", choices=EXPIRY_CHOICES, required=False, initial="30")

    def __init__(self, *args, allowed: frozenset[str], **kwargs):
        super().__init__(*args, **kwargs)
        # Only what the member's role may grant (platform:admin for staff only, never preselected).
        choices = [(value, f"{value} — {label}") for value, label in Scope.choices if value in allowed]
        self.fields["scopes"].choices = choices
        self.fields["scopes"].initial = [Scope.JOBS_READ, Scope.JOBS_WRITE]


ONCE_KEY = "tokens:new"  # the session key of the secret waiting for its one GET
ONCE_TTL_S = 300


def _fernet() -> Fernet:
    return fernet(b"opentinker/web-token-once/v1")


def _keep_once(request, token_id: int, secret: str) -> None:
    request.session[ONCE_KEY] = {"id": token_id, "secret": _fernet().encrypt(secret.encode()).decode()}


def _take_once(request):
    """(token, secret) kept by the create POST, or (None, None); gone from the session either way."""
    kept = request.session.pop(ONCE_KEY, None)
    if not isinstance(kept, dict):
        return None, None
    try:
        secret = _fernet().decrypt(str(kept.get("secret", "")).encode(), ttl=ONCE_TTL_S).decode()
        token = token_get(request.membership, int(kept.get("id")), manage_all=False)
    except (InvalidToken, TypeError, ValueError, DomainError):
        return None, None  # too old, from another key, or not this member's token in this organization
    return token, secret


def _manages_all(request) -> bool:
    return Scope.ORG_ADMIN in page_scopes(request)


def _context(request, form):
    tokens = token_list(request.membership, manage_all=_manages_all(request))
    return {"form": form, "tokens": tokens[:200], "base_url": request.build_absolute_uri("/").rstrip("/")}


@never_cache
@org_page
@require_http_methods(["GET", "POST"])
def token_index(request):
    allowed = page_scopes(request)
    form = TokenForm(request.POST or None, allowed=allowed)
    created = secret = None
    if request.method == "POST" and form.is_valid():
        days = form.cleaned_data["expires_in_days"]
        try:
            created, secret = token_create(
                membership=request.membership,
                name=form.cleaned_data["name"],
                scopes=form.cleaned_data["scopes"],
                expires_in_days=int(days) if days else None,
            )
        except DomainError as e:
            add_domain_error(form, e)
        else:
            form = TokenForm(allowed=allowed)
            if not request.headers.get("HX-Request"):
                _keep_once(request, created.pk, secret)
                response = redirect("tokens")
                response.status_code = 303  # See Other: the browser GETs the page
                return response
    elif request.method == "GET":
        created, secret = _take_once(request)
    context = _context(request, form) | {"created": created, "secret": secret}
    status = 400 if form.errors else 200
    if request.headers.get("HX-Request"):
        return render(request, "portal/tokens/_panel.html", context, status=status)
    return render(request, "portal/tokens/index.html", context, status=status)


@never_cache
@org_page
def token_detail(request, token_id: int):
    token = token_get(request.membership, token_id, manage_all=_manages_all(request))
    return render(request, "portal/tokens/detail.html", {"token": token})


@org_page
@require_POST
def token_revoke_view(request, token_id: int):
    manage_all = _manages_all(request)
    token = token_get(request.membership, token_id, manage_all=manage_all)
    token_revoke(by=request.membership, token=token, manage_all=manage_all)
    messages.success(request, f"Revoked the token “{token.name}” (otk_{token.lookup}_…): it no longer works.")
    return redirect("tokens")
