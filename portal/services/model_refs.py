"""Registry model references (`owner/name@version` as a job's `model.base`), as the domain sees them: an
interface the domain owns and the registry implements (as portal.services.env_refs for environments).

Submitting a job that names a registry model pins the exact version (`latest` resolved) and the URI of its
files in the spec (`model.base`, `model.uri`), so every attempt loads the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from django.core.exceptions import ImproperlyConfigured

from opentinker.spec import ModelRef
from portal.models import Organization


@dataclass(frozen=True)
class ResolvedModel:
    ref: str  # exact: `owner/name@3`
    uri: str  # the model directory in the organization's storage
    columns: tuple[str, ...] | None = None  # a dataset's column names, where the registry knows them


class ModelResolver(Protocol):
    def resolve(self, organization: Organization, ref: ModelRef) -> ResolvedModel:
        """The valid version `ref` names in `organization`; raises NotFound (with the reason)."""
        ...

    def uri_problem(self, organization: Organization, uri: str) -> str | None:
        """Why a raw storage URI inside the registry's folder may not be used by a job (a version pending,
        invalid, missing, or a path that is no version's directory); None when it may."""
        ...


_resolver: ModelResolver | None = None


def register_resolver(resolver: ModelResolver) -> None:
    global _resolver
    _resolver = resolver


def resolver() -> ModelResolver:
    if _resolver is None:
        raise ImproperlyConfigured("no model resolver is registered: add 'env_registry' to INSTALLED_APPS")
    return _resolver


# Datasets (`dataset.uri` = `owner/name@version`) resolve the same way, to the version's directory.
_dataset_resolver: ModelResolver | None = None


def register_dataset_resolver(resolver: ModelResolver) -> None:
    global _dataset_resolver
    _dataset_resolver = resolver


def dataset_resolver() -> ModelResolver:
    if _dataset_resolver is None:
        raise ImproperlyConfigured("no dataset resolver is registered: add 'env_registry' to INSTALLED_APPS")
    return _dataset_resolver
