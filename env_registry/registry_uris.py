"""Which registry version a raw storage URI names. A job may give `model.base` or `dataset.uri` as a URI in
its organization's storage instead of `owner/name@version`; under the registry's `models/` and `datasets/`
folders that URI must be exactly a usable version's directory, or a job could train on a version that is
pending, failed validation, or is still being published."""

from __future__ import annotations

import re

from portal import storage
from portal.models import Organization


def registry_location(organization: Organization, uri: str, folder: str) -> tuple[str, int] | str | None:
    """None when `uri` is not under the organization's `<folder>/<name>/<number>`; (name, version) when it is
    a version's directory; otherwise (a path inside one) the reason it names none."""
    base = storage.normalize(storage.file_uri(storage.organization_prefix(organization.slug), folder))
    wanted = storage.normalize(uri)
    if not wanted.startswith(base + "/"):
        return None
    parts = wanted[len(base) + 1 :].split("/")
    if len(parts) < 2 or not re.fullmatch(r"[0-9]+", parts[1]):  # str.isdigit takes "²", which int() refuses
        # Not the registry's `<name>/<version>` layout: files the organization wrote there with its own tools
        # (the data CLIs, `make demo`'s example), usable as before.
        return None
    if len(parts) != 2 or len(parts[1]) > 9:
        return (
            f"{uri!r} is inside the {folder} registry's storage but is not one version's directory: "
            f"name it as {organization.slug}/<name>@<version>"
        )
    return parts[0], int(parts[1])
