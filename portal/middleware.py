"""Request-wide plumbing that the domain needs: the origin of audit entries (portal.services.audit)."""

from __future__ import annotations

from portal.async_middleware import DualMiddleware
from portal.services.audit import audit_request


class AuditContextMiddleware(DualMiddleware):
    """Makes the request (its user, API token, address, user agent) known to ``audit_record`` while it is
    served. Placed after AuthenticationMiddleware; DRF's token authentication adds the token later.

    The request is held in a context variable: under ASGI it is set in the request's task and copied into
    the thread that runs a sync view (asgiref's sync_to_async copies the context)."""

    def call(self, request):
        with audit_request(request):
            return self.get_response(request)

    async def __acall__(self, request):
        with audit_request(request):
            return await self.get_response(request)
