"""Helpers shared by the pages' forms."""

from __future__ import annotations

from django import forms

from portal.errors import DomainError


def add_domain_error(form: forms.Form, error: DomainError, *, fields: dict[str, str] | None = None) -> None:
    """Show a service's error next to the field it names (``fields`` maps domain field names to form
    fields), or at the top of the form when it names none the form has."""
    name = (fields or {}).get(error.field or "", error.field)
    form.add_error(name if name in form.fields else None, error.message)
