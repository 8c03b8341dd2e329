"""The domain resolves environment references through an interface it owns (portal/services/env_refs.py);
the registry implements it and registers it at start-up, so the domain never imports env_registry."""

from __future__ import annotations

from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured

from env_registry.env_refs import RegistryResolver
from opentinker.spec import EnvironmentRef, example_rl_spec
from portal.actors import Actor
from portal.errors import DomainError, NotFound
from portal.services import env_refs
from portal.services.env_refs import ResolvedEnvironment
from portal.services.jobs import job_submit


class FakeResolver:
    def __init__(self) -> None:
        self.used: list[ResolvedEnvironment] = []
        self.asked: list[tuple[Any, EnvironmentRef]] = []

    def resolve(self, organization, user, ref: EnvironmentRef) -> ResolvedEnvironment:
        self.asked.append((user, ref))
        if ref.name != "fake":
            raise NotFound(f"{ref.owner}/{ref.name} does not exist")
        return ResolvedEnvironment(owner=ref.owner, name=ref.name, version="2.0.0", sha256="ab" * 32)

    def usage_record(self, resolved: ResolvedEnvironment) -> None:
        self.used.append(resolved)


def _spec(ref: str):
    spec = example_rl_spec()
    return spec.model_copy(update={"environment": spec.environment.model_copy(update={"ref": ref})})


def test_the_registry_registers_its_resolver_at_start_up():
    assert isinstance(env_refs.resolver(), RegistryResolver)


def test_without_a_resolver_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setattr(env_refs, "_resolver", None)
    with pytest.raises(ImproperlyConfigured, match="env_registry"):
        env_refs.resolver()


@pytest.mark.django_db
def test_a_job_is_resolved_pinned_and_counted_through_the_registered_resolver(monkeypatch, acme, alice):
    fake = FakeResolver()
    monkeypatch.setattr(env_refs, "_resolver", fake)
    job, created = job_submit(
        organization=acme, actor=Actor.for_request(alice), spec=_spec("acme/fake@latest")
    )
    assert created
    assert job.spec["environment"]["ref"] == "acme/fake@2.0.0"
    assert job.spec["environment"]["sha256"] == "ab" * 32
    assert fake.asked == [(alice, EnvironmentRef(owner="acme", name="fake", version="latest"))]
    assert [r.pinned_ref for r in fake.used] == ["acme/fake@2.0.0"]
    # A repeated idempotent submission is not a second use.
    key = "same-request"
    job_submit(
        organization=acme, actor=Actor.for_request(alice), spec=_spec("acme/fake@latest"), idempotency_key=key
    )
    job_submit(
        organization=acme, actor=Actor.for_request(alice), spec=_spec("acme/fake@latest"), idempotency_key=key
    )
    assert len(fake.used) == 2


@pytest.mark.django_db
def test_a_reference_the_resolver_does_not_know_is_a_field_error(monkeypatch, acme, alice):
    monkeypatch.setattr(env_refs, "_resolver", FakeResolver())
    with pytest.raises(DomainError) as e:
        job_submit(organization=acme, actor=Actor.for_request(alice), spec=_spec("acme/other@1.0.0"))
    assert e.value.field == "environment.ref" and "acme/other does not exist" in str(e.value)
