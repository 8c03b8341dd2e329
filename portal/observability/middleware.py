"""Per request: its id (``X-Request-ID``), the log context, and the per-route count and latency.

First in MIDDLEWARE, so it times and labels everything after it (redirects and refusals included). The route
label is the URL pattern Django matched (``api/v1/jobs/<str:job_id>``), never the path: a label per job id
would grow Prometheus' memory without bound. Unresolved paths (404s) share one label.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from portal.async_middleware import DualMiddleware
from portal.observability import context, metrics

HEADER = "X-Request-ID"
# A proxy's or client's id is kept when it looks like one (ids, UUIDs, trace ids); anything else, too long or
# holding characters that could forge a log line, is replaced.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@-]{1,128}")

access_log = logging.getLogger("opentinker.access")


def request_id_of(request) -> str:
    given = request.META.get("HTTP_X_REQUEST_ID", "")
    return given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


class RequestObservabilityMiddleware(DualMiddleware):
    def call(self, request):
        started, request_id = self._begin(request)
        with context.scope(request_id=request_id):
            return self._end(request, self.get_response(request), request_id, started)

    async def __acall__(self, request):
        started, request_id = self._begin(request)
        with context.scope(request_id=request_id):
            return self._end(request, await self.get_response(request), request_id, started)

    @staticmethod
    def _begin(request) -> tuple[float, str]:
        started = time.perf_counter()
        request.request_id = request_id_of(request)
        return started, request.request_id

    @staticmethod
    def _end(request, response, request_id: str, started: float):
        seconds = time.perf_counter() - started
        match = getattr(request, "resolver_match", None)
        route = match.route if match is not None and match.route else metrics.UNMATCHED_ROUTE
        metrics.observe_request(route, request.method, response.status_code, seconds)
        response[HEADER] = request_id
        if access_log.isEnabledFor(logging.INFO):
            access_log.info(
                "%s %s %s",
                request.method,
                route,
                response.status_code,
                extra={
                    "method": request.method,
                    "route": route,
                    "status": response.status_code,
                    "duration_ms": round(seconds * 1000, 2),
                },
            )
        return response
