"""Guards on raw API requests (path and body size), enforced before anything reads the body."""

from __future__ import annotations

import re

from django.conf import settings
from django.http import JsonResponse

from env_registry import uploads
from portal.async_middleware import DualMiddleware

BODY_METHODS = ("POST", "PUT", "PATCH", "DELETE")
# Environment package uploads (multipart) have their own, larger limit: the archive's plus the form's
# overhead.
ENV_UPLOAD_PATH = "/api/v1/envs"
MULTIPART_OVERHEAD_BYTES = 64 * 1024


# A registry upload's chunk (raw bytes, up to env_registry.uploads.CHUNK_MAX_BYTES: its parser's limit).
UPLOAD_CHUNK_PATH = re.compile(r"^/api/v1/org/uploads/[^/]+/files/[0-9]+$")


def body_limit(request) -> int:
    if request.path == ENV_UPLOAD_PATH and request.method == "POST":
        return settings.ENV_ARCHIVE_MAX_BYTES + MULTIPART_OVERHEAD_BYTES
    if request.method == "PUT" and UPLOAD_CHUNK_PATH.match(request.path):
        return max(uploads.CHUNK_MAX_BYTES, settings.API_MAX_BODY_BYTES)
    return settings.API_MAX_BODY_BYTES


def _error(status: int, code: str, message: str) -> JsonResponse:
    return JsonResponse({"error": {"code": code, "message": message, "fields": {}}}, status=status)


class ApiRequestGuardMiddleware(DualMiddleware):
    """Refuse malformed API requests before anything reads them.

    404 for paths holding NUL characters, 413 for bodies over API_MAX_BODY_BYTES, 411 for bodies of unknown
    length.

    It runs before Django or DRF buffer the body, so an oversized request costs nothing and gets the API's
    JSON error shape rather than Django's HTML 400 page. A chunked body has no length to check up front;
    clients (our SDK, curl, browsers) always send Content-Length for JSON, so the API requires it.
    """

    def call(self, request):
        refused = refusal(request)
        return refused if refused is not None else self.get_response(request)

    async def __acall__(self, request):
        refused = refusal(request)
        return refused if refused is not None else await self.get_response(request)


def refusal(request) -> JsonResponse | None:
    """The error answer for a request the API refuses before reading it; None for one it lets through."""
    if request.path.startswith("/api/") and "\x00" in request.path:
        # PostgreSQL cannot even compare a string holding NUL; no object's id or name contains one.
        return _error(404, "not_found", "not found")
    if request.path.startswith("/api/") and request.method in BODY_METHODS:
        limit = body_limit(request)
        length = request.META.get("CONTENT_LENGTH")
        # Transfer-Encoding first: the production server's WSGI path (portal.asgi_split) gives a chunked body
        # the length it read.
        if "chunked" in request.META.get("HTTP_TRANSFER_ENCODING", "").lower():
            return _error(411, "length_required", "send the body with a Content-Length header")
        if length:
            try:
                size = int(length)
            except ValueError:
                return _error(400, "parse_error", "Content-Length is not a number")
            if size > limit:
                return _error(
                    413, "payload_too_large", f"request body is {size} bytes; the limit is {limit} bytes"
                )
    return None
