"""The portal's built front-end bundle must exist: a missing bundle is an error at start-up, never a page
without its scripts and styles.

`npm run build` in frontend/ (run by `make demo` and `make test`) writes it to portal/static/portal/dist/.
Checked by Django's system checks (`manage.py check`, `migrate`, `runserver`) and by the ASGI entry point, so
uvicorn refuses to start without it.
"""

from __future__ import annotations

from pathlib import Path

from django.core import checks
from django.core.exceptions import ImproperlyConfigured

DIST = Path(__file__).resolve().parent.parent / "static" / "portal" / "dist"
REQUIRED = ("app.js", "job.js", "compare.js", "app.css", "htmx.min.js")
HINT = "build it with `make frontend` (or `cd frontend && npm ci && npm run build`)"


def bundle_missing(dist: Path | None = None) -> list[str]:
    """The bundle files that are not there (all of them when the build never ran)."""
    dist = dist or DIST
    return [name for name in REQUIRED if not (dist / name).is_file()]


def require_bundle(dist: Path | None = None) -> None:
    dist = dist or DIST
    missing = bundle_missing(dist)
    if missing:
        raise ImproperlyConfigured(
            f"the portal's front-end bundle is missing from {dist} ({', '.join(missing)}): {HINT}"
        )


@checks.register(checks.Tags.staticfiles)
def check_bundle(app_configs=None, **kwargs):
    missing = bundle_missing()
    if not missing:
        return []
    return [
        checks.Error(
            f"the portal's front-end bundle is missing from {DIST} ({', '.join(missing)})",
            hint=HINT,
            id="portal.E001",
        )
    ]
