"""Redeem the platform's single-use bootstrap token for this job's secrets, once, at start.

Where a job's environment is readable by others (a Ray job's ``runtime_env``, shown by ``ray job list``), the
platform gives the runtime ``OPENTINKER_BOOTSTRAP_TOKEN`` instead of ``OPENTINKER_JOB_TOKEN`` and
``OPENTINKER_ENV_SECRET``; this trades it (``POST {OPENTINKER_INGEST_URL}/bootstrap``) for both and puts
them into this process's environment, where the rest of the runtime reads them. A refused token (401:
expired, or already used: by whom?) is final; only a connection error or a 5xx is retried.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import MutableMapping

BOOTSTRAP_VAR = "OPENTINKER_BOOTSTRAP_TOKEN"
JOB_TOKEN_VAR = "OPENTINKER_JOB_TOKEN"  # noqa: S105 (a variable name)
ENV_SECRET_VAR = "OPENTINKER_ENV_SECRET"  # noqa: S105 (a variable name, not a secret)
MODEL_SERVER_VARS = {
    "model_server_token": "OPENTINKER_MODEL_SERVER_TOKEN",
    "queue_url": "OPENTINKER_QUEUE_URL",
}


class BootstrapError(RuntimeError):
    pass


def redeem(
    environ: MutableMapping[str, str] | None = None, *, attempts: int = 5, timeout_s: float = 30
) -> bool:
    """Exchange the bootstrap token if there is one; True when it was exchanged. Raises BootstrapError."""
    environ = os.environ if environ is None else environ
    raw = environ.pop(BOOTSTRAP_VAR, "")  # gone from the environment children inherit, used or not
    if not raw:
        return False
    base = environ.get("OPENTINKER_INGEST_URL", "").rstrip("/")
    if not base:
        raise BootstrapError(f"{BOOTSTRAP_VAR} is set but OPENTINKER_INGEST_URL is not")
    req = urllib.request.Request(  # noqa: S310 (the platform's URL)
        f"{base}/bootstrap",
        data=b"{}",
        method="POST",
        headers={"Authorization": f"Bearer {raw}", "Content-Type": "application/json"},
    )
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:  # noqa: S310
                body = json.loads(resp.read())
            break
        except urllib.error.HTTPError as e:
            if e.code < 500 or attempt == attempts - 1:
                detail = e.read()[:500].decode("utf-8", errors="replace")
                raise BootstrapError(
                    f"the platform refused the bootstrap token ({e.code}): {detail}"
                ) from None
        except (urllib.error.URLError, OSError) as e:
            if attempt == attempts - 1:
                raise BootstrapError(f"could not reach the platform to bootstrap: {e}") from None
        time.sleep(min(10, 2**attempt))
    token = body.get("job_token") if isinstance(body, dict) else None
    if not isinstance(token, str) or not token:
        raise BootstrapError("the platform's bootstrap answer has no job token")
    environ[JOB_TOKEN_VAR] = token
    secret = body.get("environment_secret")
    if secret:
        environ[ENV_SECRET_VAR] = str(secret)
    for key, var in MODEL_SERVER_VARS.items():  # a Tinker model server's (serve.py `serve_spec`)
        if body.get(key):
            environ[var] = str(body[key])
    return True
