"""Root URLs: the portal pages, the REST API, the Django admin for platform staff."""

from django.contrib import admin
from django.http import JsonResponse
from django.urls import include, path


def healthz(request):
    return JsonResponse({"status": "ok"})


urlpatterns = [
    path("healthz", healthz),
    path("api/", include("api.urls")),
    path("django-admin/", admin.site.urls),
    path("", include("portal.web.urls")),
]
