"""Who did something: recorded on every job event (who, when, why)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Actor:
    user: Any = None  # django.contrib.auth user, or None for the system
    token: Any = None  # portal.models.ApiToken when acting through a token
    label: str = "system"

    @classmethod
    def system(cls, label: str = "system") -> Actor:
        return cls(label=label)

    @classmethod
    def for_request(cls, user: Any, token: Any = None) -> Actor:
        label = user.get_username()
        if token is not None:
            label = f"{label} (token {token.name})"
        return cls(user=user, token=token, label=label[:100])
