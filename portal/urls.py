"""Root URLs: the portal pages, the REST API, the Django admin for platform staff."""

from django.contrib import admin
from django.http import JsonResponse
from django.urls import include, path

from api.views.health import HealthzApi, LivenessApi, ReadinessApi
from api.views.metrics import metrics_view


def not_found(request, exception=None):
    # Programs get the API's JSON error shape for unknown API URLs; people get Django's page.
    if request.path.startswith(("/api/", "/tinker/")):
        return JsonResponse(
            {"error": {"code": "not_found", "message": "not found", "fields": {}}}, status=404
        )
    from django.views.defaults import page_not_found

    return page_not_found(request, exception)


handler404 = not_found


urlpatterns = [
    # Liveness (/healthz is its old name, kept) and readiness: api/views/health.py, README "Operations".
    path("healthz", HealthzApi.as_view()),
    path("livez", LivenessApi.as_view()),
    path("readyz", ReadinessApi.as_view()),
    # Prometheus, for the operator only (README "Observability"): api/views/metrics.py.
    path("metrics", metrics_view),
    path("api/", include("api.urls")),
    # The Tinker-compatible API (issue 16): the tinker SDK's base URL is http://<host>/tinker.
    path("tinker/", include("api.tinker.urls")),
    path("django-admin/", admin.site.urls),
    path("", include("portal.web.urls")),
]
