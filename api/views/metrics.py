"""``GET /metrics``: the Prometheus exposition (portal/observability/metrics.py), for the operator's scraper.

Never open by default: it says how busy every tenant is. It answers 404 (as if absent) until METRICS_TOKEN or
METRICS_ALLOW_FROM is set; then a request passes with ``Authorization: Bearer <METRICS_TOKEN>`` (compared in
constant time) or from a direct peer address in METRICS_ALLOW_FROM (REMOTE_ADDR only: a scraper connects to
the pod itself, and X-Forwarded-For is the client's to write), and gets 401 otherwise. A plain Django view,
outside the tenant API: no session, no API token, no throttle, not in the OpenAPI schema.
"""

from __future__ import annotations

import hmac
import ipaddress

from django.conf import settings
from django.http import HttpResponse, JsonResponse
from django.views.decorators.http import require_GET
from prometheus_client import CONTENT_TYPE_LATEST

from portal.observability.metrics import exposition


def _error(status: int, code: str, message: str) -> JsonResponse:
    return JsonResponse({"error": {"code": code, "message": message, "fields": {}}}, status=status)


def metrics_allowed(request) -> bool:
    token = settings.METRICS_TOKEN
    if token:
        scheme, _, given = request.META.get("HTTP_AUTHORIZATION", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode()):
            return True
    if settings.METRICS_ALLOW_FROM:
        try:
            peer = ipaddress.ip_address(request.META.get("REMOTE_ADDR", ""))
        except ValueError:
            return False
        return any(peer in network for network in settings.METRICS_ALLOW_FROM)
    return False


@require_GET
def metrics_view(request):
    if not settings.METRICS_TOKEN and not settings.METRICS_ALLOW_FROM:
        return _error(404, "not_found", "not found")
    if not metrics_allowed(request):
        response = _error(401, "not_authenticated", "metrics need the scraper's bearer token")
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    response = HttpResponse(exposition(), content_type=CONTENT_TYPE_LATEST)
    response["Cache-Control"] = "no-store"
    return response
