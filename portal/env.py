"""Typed settings from the environment (12-factor), with the embedded defaults' files as a fallback.

Precedence: the process environment, then ``var/services.env`` (written by ``manage.py opentinker up``), then
``var/secrets.env`` (generated once for the embedded default). Production sets everything in the environment.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured


def _read_env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, _, value = line.partition("=")
                values[key.strip()] = value.strip()
    return values


class Env:
    def __init__(self, *files: Path) -> None:
        self._file_values: dict[str, str] = {}
        for f in reversed(files):  # earlier files win
            self._file_values.update(_read_env_file(f))

    def get(self, key: str, default: str | None = None) -> str | None:
        if key in os.environ:
            return os.environ[key]
        return self._file_values.get(key, default)

    def str(self, key: str, default: str | None = None) -> str:
        value = self.get(key, default)
        if value is None:
            raise ImproperlyConfigured(f"{key} must be set")
        return value

    def bool(self, key: str, default: bool) -> bool:
        value = self.get(key)
        if value is None or value == "":
            return default
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ImproperlyConfigured(f"{key} must be a boolean (true/false), got {value!r}")

    def int(self, key: str, default: int, *, minimum: int | None = None, maximum: int | None = None) -> int:
        value = self.get(key)
        if value is None or value == "":
            return default
        try:
            number = int(value)
        except ValueError:
            raise ImproperlyConfigured(f"{key} must be an integer, got {value!r}") from None
        if minimum is not None and number < minimum:
            raise ImproperlyConfigured(f"{key} must be an integer >= {minimum}, got {value!r}")
        if maximum is not None and number > maximum:
            raise ImproperlyConfigured(f"{key} must be an integer <= {maximum}, got {value!r}")
        return number

    def seconds(self, key: str, default: float, *, finite: bool = False, positive: bool = False) -> float:
        """A duration: a number of seconds >= 0 (> 0 with ``positive``), ``inf`` unless ``finite``."""
        value = self.get(key)
        return _parse_seconds(key, default if value is None or value == "" else value, finite, positive)

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.get(key) or default
        if value not in choices:
            raise ImproperlyConfigured(f"{key} must be one of {', '.join(choices)}; got {value!r}")
        return value

    def rate(self, key: str, default: str) -> str:
        """A DRF throttle rate: ``<requests>/<period>``, the period read by its initial (s, m, h, d)."""
        value = self.get(key) or default
        if not _RATE.fullmatch(value):
            raise ImproperlyConfigured(f"{key} must be a rate like 100/s or 1200/min, got {value!r}")
        return value

    def command(self, key: str) -> list[str] | None:
        """A command line as a JSON list of strings (unset or empty: None, the caller's default)."""
        value = self.get(key)
        if not value:
            return None
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = None
        if not isinstance(parsed, list) or not parsed or not all(isinstance(x, str) for x in parsed):
            raise ImproperlyConfigured(
                f'{key} must be a JSON list of strings, e.g. ["python", "-m", "x"]; got {value!r}'
            )
        return parsed

    def mapping(self, key: str) -> dict[str, str]:
        """A JSON object of strings (unset or empty: none)."""
        value = self.get(key)
        if not value:
            return {}
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict) or not all(isinstance(v, str) for v in parsed.values()):
            raise ImproperlyConfigured(
                f'{key} must be a JSON object of strings, e.g. {{"NAME": "value"}}; got {value!r}'
            )
        return parsed

    def list(self, key: str, default: list[str]) -> list[str]:
        value = self.get(key)
        if value is None:
            return default
        return [item.strip() for item in value.split(",") if item.strip()]


_RATE = re.compile(r"[0-9]+/[smhd][a-z]*")


def _parse_seconds(name: str, raw: object, finite: bool = False, positive: bool = False) -> float:
    """``raw`` as a number of seconds, or a configuration error naming ``name`` (NaN is never a duration)."""
    try:
        value = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        value = math.nan
    if finite and not value < math.inf:
        raise ImproperlyConfigured(f"{name} must be a finite number of seconds >= 0, got {raw!r}")
    if positive and not value > 0:
        raise ImproperlyConfigured(f"{name} must be a number of seconds > 0, got {raw!r}")
    if not value >= 0:  # also NaN
        raise ImproperlyConfigured(f"{name} must be a number of seconds >= 0 (or inf), got {raw!r}")
    return value


def ensure_embedded_secrets(path: Path) -> None:
    """Generate the embedded default's secrets once, so a restart keeps sessions and tokens valid."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"SECRET_KEY={secrets.token_urlsafe(50)}\nTOKEN_PEPPER={secrets.token_urlsafe(32)}\n")
    tmp.chmod(0o600)
    os.replace(tmp, path)


LEGACY_PEPPER_ID = "0"
_PEPPER_ID = re.compile(r"^[A-Za-z0-9_-]{1,16}$")


def token_peppers(rotated: str | None, single: str | None) -> dict[str, str]:
    """The peppers that key API-token hashes, newest first, by id.

    ``TOKEN_PEPPERS`` is ``id:value,id:value`` (newest first); ``TOKEN_PEPPER``, the single pepper of before
    rotation, is the oldest one with id ``0`` when it is set. New tokens are hashed under the newest; a token
    stores its pepper's id, so checking it costs one HMAC whatever the number of peppers.
    """
    peppers: dict[str, str] = {}
    for item in (rotated or "").split(","):
        item = item.strip()
        if not item:
            continue
        pepper_id, sep, value = item.partition(":")
        if not sep or not _PEPPER_ID.match(pepper_id) or not value:
            raise ImproperlyConfigured(
                "TOKEN_PEPPERS must be 'id:value,id:value' (newest first; ids: 1-16 of A-Z a-z 0-9 - _)"
            )
        if pepper_id in peppers:
            raise ImproperlyConfigured(f"TOKEN_PEPPERS names the pepper id {pepper_id!r} twice")
        peppers[pepper_id] = value
    if single and LEGACY_PEPPER_ID not in peppers:
        peppers[LEGACY_PEPPER_ID] = single
    if not peppers:
        raise ImproperlyConfigured("TOKEN_PEPPER must be set (or TOKEN_PEPPERS, to rotate peppers)")
    return peppers
