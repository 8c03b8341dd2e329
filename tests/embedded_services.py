"""pytest plugin (``-p tests.embedded_services``): real PostgreSQL + Valkey for the whole test session.

Unless DATABASE_URL and REDIS_URL are both already set (CI services, a developer's own servers), start the
embedded servers in a throwaway directory and export their URLs. It has to happen in
``pytest_load_initial_conftests`` ahead of pytest-django, which imports the settings (and so reads
DATABASE_URL) in that same hook. xdist workers inherit the exported URLs and so share this one pair.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from devstack.embedded import EmbeddedServices

_services: EmbeddedServices | None = None
_owner: object = None  # the pytest config that started them (an in-process inner run must not stop them)


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config, parser, args):
    global _services, _owner
    # Submission resolves a remote environment's host for the egress policy: in tests through a resolver that
    # answers from a table (tests/egress_hosts.py), never through DNS.
    os.environ.setdefault("OPENTINKER_EGRESS_RESOLVER", "tests.egress_hosts.resolve")
    if not os.environ.get("OBJECT_STORE_URL"):
        # Tests (and the servers they start, which inherit this environment) never write into the repo's var/
        objects = tempfile.mkdtemp(prefix="otk-test-objects-")
        atexit.register(shutil.rmtree, objects, ignore_errors=True)
        os.environ["OBJECT_STORE_URL"] = f"file://{objects}"
    if _services is not None or (os.environ.get("DATABASE_URL") and os.environ.get("REDIS_URL")):
        return
    root = Path(tempfile.mkdtemp(prefix="otk-test-"))
    root.chmod(0o755)  # mkdtemp makes it 0700; as root, postgres runs as a system user that must traverse it
    services = EmbeddedServices(root, fast=True)
    try:
        urls = services.start()
    except BaseException:
        with contextlib.suppress(Exception):  # keep the start error, not a follow-up one
            _shutdown(services)
        raise
    _services, _owner = services, early_config
    # pytest_unconfigure never comes when startup fails after this hook (a conftest import error, bad
    # settings in pytest-django's hook): then the interpreter's exit stops the servers
    atexit.register(_stop_at_exit)
    os.environ.update(urls.as_env())


def pytest_unconfigure(config):
    if config is _owner:
        _stop_at_exit()


def _stop_at_exit() -> None:
    global _services
    if _services is not None:
        services, _services = _services, None
        _shutdown(services)


def _shutdown(services: EmbeddedServices) -> None:
    try:
        services.stop()
    finally:
        shutil.rmtree(services.root, ignore_errors=True)
