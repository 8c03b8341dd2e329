"""ASGI entry point: uvicorn serves the portal and the API (ASGI is needed for Server-Sent Events)."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
application = get_asgi_application()

# The web server refuses to start without the pages' built scripts and styles (see portal/web/checks.py).
from portal.web.checks import require_bundle  # noqa: E402 (needs the settings configured above)

require_bundle()
