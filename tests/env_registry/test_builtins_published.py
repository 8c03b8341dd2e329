"""Every built-in of the SDK is published as a valid public package whose manifest matches the code."""

from __future__ import annotations

import importlib

import pytest

from env_registry.models import EnvironmentVersion
from opentinker.env.builtin import BUILTINS, PROTOCOL_KINDS

pytestmark = pytest.mark.django_db


def test_every_builtin_is_published_and_its_manifest_loads():
    versions = {
        v.package.name: v
        for v in EnvironmentVersion.objects.filter(package__organization__slug="opentinker").select_related(
            "package"
        )
    }
    assert set(versions) == set(BUILTINS)
    for name, v in versions.items():
        assert v.status == "valid" and v.package.visibility == "public"
        module, _, attr = v.manifest["entrypoint"].partition(":")
        assert getattr(importlib.import_module(module), attr) is BUILTINS[name]
        assert v.manifest["protocol"] == PROTOCOL_KINDS[name]
        assert tuple(v.manifest["roles"]) == (BUILTINS[name].roles or ("agent",))
