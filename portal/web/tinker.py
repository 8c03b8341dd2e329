"""Training through the Tinker-compatible API, as people see it: an organization's sessions, training clients
(base model, LoRA rank, steps) and saved weights with their `tinker://` paths and adapter downloads; and, in
the admin console, the model servers (one per base model) with their adapters and queue depth.

Reads go through api.tinker.selectors (the app that owns these rows; every lookup takes the organization).
The adapter's files download through the API's file route, which a signed-in browser may call. A merged
Hugging Face model needs torch, which the web tier never imports: the page gives the CLI's command for it.
"""

from __future__ import annotations

from django.shortcuts import render

from api.tinker import selectors
from portal.selectors.usage import organization_usage
from portal.web.console import staff_page
from portal.web.tenancy import org_page


@org_page
def tinker_index(request):
    org = request.organization
    session_id = request.GET.get("session") or None
    session = selectors.session_detail(org, session_id) if session_id else None  # another org's: a 404
    # The page shows 200 at most: slice before listing each one's files (a storage LIST per row).
    weights = list(selectors.weights_list(org, session_id=session_id)[:200])
    for w in weights:
        w.path = selectors.weights_path(w)
        w.files = selectors.weights_files(w)
        w.has_adapter = {f.name for f in w.files} >= set(selectors.ADAPTER_FILES)
    context = {
        "organization": org,
        "session": session,
        "sessions": selectors.session_list(org)[:100],
        "models": selectors.model_list(org, session_id=session_id)[:200],
        "weights": weights,
        # Metered per organization and month (tokens the model servers processed, their time), not per model.
        "usage": [m for m in organization_usage(org, months=6) if m.tinker_tokens or m.model_server_hours]
        or organization_usage(org, months=1),
    }
    return render(request, "portal/tinker/index.html", context)


@staff_page
def console_model_servers(request):
    return render(
        request,
        "portal/console/model_servers.html",
        {"servers": selectors.model_servers(), "section": "model_servers"},
    )
