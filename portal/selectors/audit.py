"""Reads of the audit log: an organization's own entries for its admins, every entry for platform staff, and
the same rows as CSV or JSON Lines for download."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator
from datetime import datetime

from django.core.serializers.json import DjangoJSONEncoder
from django.db.models import QuerySet

from portal.models import AuditEntry, Organization

EXPORT_FORMATS = ("csv", "jsonl")
EXPORT_COLUMNS = (
    "id",
    "created_at",
    "organization",
    "actor",
    "actor_user",
    "actor_token",
    "action",
    "target_type",
    "target_id",
    "target_label",
    "ip",
    "user_agent",
    "details",
)
# A spreadsheet runs a cell that starts with one of these as a formula (CSV injection): tenants name tokens.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _filtered(
    qs: QuerySet,
    *,
    action: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    actor: str | None = None,
) -> QuerySet:
    if action:
        qs = qs.filter(action=action)
    if since is not None:
        qs = qs.filter(created_at__gte=since)
    if until is not None:
        qs = qs.filter(created_at__lt=until)
    if actor:
        qs = qs.filter(actor_user__username=actor)
    return qs


def _base() -> QuerySet:
    return AuditEntry.objects.select_related("organization", "actor_user", "actor_token").order_by(
        "-created_at", "-id"
    )


def audit_list(organization: Organization, **filters) -> QuerySet:
    """The organization's entries, newest first (platform-wide ones, like pool changes, are not its)."""
    return _filtered(_base().filter(organization=organization), **filters)


def audit_list_all(*, organization_slug: str | None = None, **filters) -> QuerySet:
    """Every entry, for platform staff; optionally one organization's."""
    qs = _base()
    if organization_slug:
        qs = qs.filter(organization__slug=organization_slug)
    return _filtered(qs, **filters)


def audit_row(entry: AuditEntry) -> dict:
    token = entry.actor_token
    return {
        "id": entry.id,
        "created_at": entry.created_at,
        "organization": entry.organization.slug if entry.organization_id else None,
        "actor": entry.actor_label,
        "actor_user": entry.actor_user.username if entry.actor_user_id else None,
        "actor_token": f"otk_{token.lookup}_…" if token is not None else None,
        "action": entry.action,
        "target_type": entry.target_type,
        "target_id": entry.target_id,
        "target_label": entry.target_label,
        "ip": entry.ip,
        "user_agent": entry.user_agent,
        "details": entry.details,
    }


class _Encoder(DjangoJSONEncoder):
    # Full precision, as the API writes times (DjangoJSONEncoder cuts them to milliseconds).
    def default(self, o):
        if isinstance(o, datetime):
            return _time(o)
        return super().default(o)


def _time(value: datetime) -> str:
    text = value.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def _csv_cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, dict | list):
        value = json.dumps(value, cls=_Encoder, sort_keys=True)
    elif isinstance(value, datetime):
        value = _time(value)
    value = str(value)
    return "'" + value if value.startswith(_FORMULA_START) else value


def audit_export(entries: Iterable[AuditEntry], fmt: str) -> Iterator[str]:
    """The entries as text chunks: CSV with a header row, or one JSON object a line."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {', '.join(EXPORT_FORMATS)}")
    if fmt == "jsonl":
        for entry in entries:
            yield json.dumps(audit_row(entry), cls=_Encoder, ensure_ascii=False) + "\n"
        return
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(EXPORT_COLUMNS)
    for entry in entries:
        row = audit_row(entry)
        writer.writerow([_csv_cell(row[c]) for c in EXPORT_COLUMNS])
        if buffer.tell() > 64 * 1024:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()
