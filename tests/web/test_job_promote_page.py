"""The job page's form that promotes a checkpoint into the model registry. Actors: alice (owner of acme)
promotes, bob (viewer of acme here) is offered no form and refused with the reason, charlie (globex) 404."""

from __future__ import annotations

import pytest

from env_registry.models import ModelVersion
from opentinker.spec import example_rl_spec
from portal.actors import Actor
from portal.models import Membership, Role
from portal.services.jobs import job_submit
from tests.api.test_registry_promote import RUNTIME_FILES, write_checkpoint
from tests.tiny_model import tiny_model_files
from tests.web.pages import signed_in

pytestmark = pytest.mark.django_db


def test_the_job_page_promotes_a_checkpoint(alice, bob, charlie, acme, globex, settings, tmp_path):
    settings.OBJECT_STORE_URL = f"file://{tmp_path / 'objects'}"
    settings.ENV_VALIDATION_MODE = "celery"  # the sandbox's check is tests/api/test_registry_promote.py's
    Membership.objects.filter(user=bob, organization=acme).update(role=Role.VIEWER)
    job, _ = job_submit(organization=acme, spec=example_rl_spec(), actor=Actor.for_request(alice))
    write_checkpoint(tmp_path / "objects", job, 3, {**tiny_model_files(), **RUNTIME_FILES})
    write_checkpoint(tmp_path / "objects", job, 6, {**tiny_model_files(seed=1), **RUNTIME_FILES})

    page = signed_in(alice).get(f"/jobs/{job.pk}/").content.decode()
    assert 'id="promote-checkpoint"' in page and '<option value="6" selected>step 6</option>' in page
    r = signed_in(alice).post(f"/jobs/{job.pk}/promote/", {"step": "3", "name": "trained"}, follow=True)
    assert "Promoted the checkpoint as acme/trained@1 (pending)." in r.content.decode()
    version = ModelVersion.objects.get()
    assert version.info["source"] == f"job:{job.pk}@3"

    r = signed_in(alice).post(f"/jobs/{job.pk}/promote/", {"step": "3", "name": "Not A Name"}, follow=True)
    assert "name is 1-64 lowercase letters" in r.content.decode()

    assert 'id="promote-checkpoint"' not in signed_in(bob).get(f"/jobs/{job.pk}/").content.decode()
    r = signed_in(bob).post(f"/jobs/{job.pk}/promote/", {"step": "3", "name": "mine"})
    assert r.status_code == 403 and "cannot promote checkpoints into the model registry" in r.content.decode()
    assert signed_in(charlie).post(f"/jobs/{job.pk}/promote/", {"name": "x"}).status_code == 404
    assert ModelVersion.objects.count() == 1


def test_a_step_that_is_not_a_number_promotes_nothing(alice, acme, settings, tmp_path):
    settings.OBJECT_STORE_URL = f"file://{tmp_path / 'objects'}"
    settings.ENV_VALIDATION_MODE = "celery"
    job, _ = job_submit(organization=acme, spec=example_rl_spec(), actor=Actor.for_request(alice))
    write_checkpoint(tmp_path / "objects", job, 3, {**tiny_model_files(), **RUNTIME_FILES})
    r = signed_in(alice).post(f"/jobs/{job.pk}/promote/", {"step": "3x", "name": "trained"}, follow=True)
    assert "step &#x27;3x&#x27; is not a checkpoint&#x27;s step number" in r.content.decode()
    assert ModelVersion.objects.count() == 0  # not the latest checkpoint instead
    r = signed_in(alice).post(f"/jobs/{job.pk}/promote/", {"name": "trained"}, follow=True)
    assert "Promoted the checkpoint as acme/trained@1 (pending)." in r.content.decode()
    assert ModelVersion.objects.get().info["source"] == f"job:{job.pk}@3"
