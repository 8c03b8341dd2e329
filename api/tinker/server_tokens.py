"""Model-server tokens (`otm_...`): they live in portal/services/model_server_tokens.py, where the drivers
that start model servers can issue them; re-exported here for the Tinker API's ingest auth."""

from portal.services.model_server_tokens import (
    DEFAULT_TTL_SECONDS,
    MAX_LENGTH,
    MAX_TTL_DAYS,
    PREFIX,
    model_server_token_issue,
    model_server_token_verify,
)

__all__ = [
    "DEFAULT_TTL_SECONDS",
    "MAX_LENGTH",
    "MAX_TTL_DAYS",
    "PREFIX",
    "model_server_token_issue",
    "model_server_token_verify",
]
