"""Request-wide plumbing that the domain needs: the origin of audit entries (portal.services.audit)."""

from __future__ import annotations

from portal.services.audit import audit_request


class AuditContextMiddleware:
    """Makes the request (its user, API token, address, user agent) known to ``audit_record`` while it is
    served. Placed after AuthenticationMiddleware; DRF's token authentication adds the token later."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        with audit_request(request):
            return self.get_response(request)
