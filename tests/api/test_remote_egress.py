"""Egress policy at submission: a remote environment URL the policy refuses is a 400 naming environment.ref
and stores nothing; the allow-lists platform admins set (per organization, per pool) admit private servers,
only for their own scope; the launcher hands the job's list to the runtime, which checks again.

Actors: alice (owner of acme), bob (member of acme), charlie (owner of globex). Host names resolve through the
tests' table (tests/egress_hosts.py, injected as OPENTINKER_EGRESS_RESOLVER): no DNS, no connection at all.
"""

from __future__ import annotations

import pytest

from opentinker.spec import example_rl_spec
from portal.actors import Actor
from portal.models import Allocation, Job
from portal.services.egress import runtime_egress_env
from portal.services.jobs import job_submit
from portal.services.scheduler import schedule_pass
from tests.workers.conftest import make_pool
from workers.drivers import job_env

pytestmark = pytest.mark.django_db

JOBS = "/api/v1/jobs"


def spec(ref: str, pool: str | None = None) -> dict:
    s = example_rl_spec().model_dump(mode="json")
    s["environment"] = {"ref": ref}
    s["resources"]["pool"] = pool
    return s


REFUSED = [
    ("http://127.0.0.1:8931", "plain http"),
    ("https://127.0.0.1:8931/", "loopback"),
    ("https://2130706433/", "loopback"),
    ("https://0x7f000001/", "loopback"),
    ("https://0177.0.0.1/", "loopback"),
    ("https://127.1/", "loopback"),
    ("https://[::1]/", "loopback"),
    ("https://[::ffff:127.0.0.1]/", "loopback"),
    ("https://169.254.169.254/latest/meta-data/", "never allowed"),
    ("https://10.0.0.1/", "private"),
    ("https://[fd00::1]/", "private"),
    ("https://100.64.0.1/", "CGNAT"),
    ("https://loopback.example/env", "loopback.example resolves to 127.0.0.1"),
    ("https://mapped.example/env", "loopback"),
    ("https://metadata.example/env", "never allowed"),
    ("https://private.example/env", "private"),
    ("https://rebind.example/env", "resolves to 192.168.0.10"),
    ("http://env.example/env", "plain http"),
    ("https://nowhere.example/env", "cannot resolve nowhere.example"),
    ("https://user:pw@env.example/env", "credentials"),
]


@pytest.mark.parametrize(("ref", "why"), REFUSED)
def test_refused_urls_are_a_400_naming_environment_ref(as_alice, ref, why):
    before = Job.objects.count()
    r = as_alice.post(JOBS, spec(ref), format="json")
    assert r.status_code == 400, r.content
    error = r.json()["error"]
    assert error["code"] == "invalid"
    (message,) = error["fields"]["environment.ref"]
    assert message.startswith("remote environment refused by the egress policy")
    assert why in message
    assert Job.objects.count() == before


def test_a_public_https_server_is_accepted(as_alice):
    r = as_alice.post(JOBS, spec("https://env.example/arithmetic"), format="json")
    assert r.status_code == 201, r.content


def test_an_organizations_allow_list_admits_its_private_server_for_it_alone(
    settings, as_alice, as_bob, as_charlie
):
    settings.OPENTINKER_EGRESS_ALLOW = {"org:acme": ["127.0.0.1:8931", "private.example"]}
    for client in (as_alice, as_bob):  # the owner and a teammate
        for ref in ("http://127.0.0.1:8931", "https://private.example/env"):
            assert client.post(JOBS, spec(ref), format="json").status_code == 201
    # Another port of the same address is not on the list; the outsider's organization has no list.
    r = as_alice.post(JOBS, spec("http://127.0.0.1:8932"), format="json")
    assert r.status_code == 400 and "environment.ref" in r.json()["error"]["fields"]
    for ref in ("http://127.0.0.1:8931", "https://private.example/env"):
        r = as_charlie.post(JOBS, spec(ref), format="json")
        assert r.status_code == 400 and "environment.ref" in r.json()["error"]["fields"]
    # Even an allow-listed name never leads to the metadata service.
    settings.OPENTINKER_EGRESS_ALLOW = {"org:acme": ["metadata.example"]}
    r = as_alice.post(JOBS, spec("https://metadata.example/"), format="json")
    assert r.status_code == 400 and "never allowed" in r.json()["error"]["fields"]["environment.ref"][0]


def test_a_pools_allow_list_applies_to_jobs_on_that_pool(settings, as_alice, acme, alice):
    make_pool("private-pool", 2, cpu_slots=True, cpus=4)
    settings.OPENTINKER_EGRESS_ALLOW = {"pool:private-pool": ["10.0.0.0/8"], "*": ["env.example"]}
    assert (
        as_alice.post(
            JOBS, spec("https://private.example/env", pool="private-pool"), format="json"
        ).status_code
        == 201
    )
    r = as_alice.post(JOBS, spec("https://private.example/env"), format="json")  # the scheduler's choice
    assert r.status_code == 400 and "private" in r.json()["error"]["fields"]["environment.ref"][0]
    # The launcher hands the runtime this job's list (global + organization + pool) and the platform's own
    # addresses; the runtime checks every connection against them again.
    job = Job.objects.get(spec__environment__ref="https://private.example/env")
    assert job.pk in schedule_pass().admitted
    env = job_env(job, Allocation.objects.get(job=job, released_at__isnull=True))
    assert env["OPENTINKER_EGRESS_ALLOW"] == "env.example,10.0.0.0/8"
    assert "127.0.0.1" in env["OPENTINKER_EGRESS_DENY"].split(",")  # this machine's own addresses
    assert runtime_egress_env("globex", None)["OPENTINKER_EGRESS_ALLOW"] == "env.example"


def test_services_check_too_not_only_the_api(acme, alice):
    from opentinker.spec import JobSpec
    from portal.errors import DomainError

    with pytest.raises(DomainError) as e:
        job_submit(
            organization=acme, actor=Actor.system("test"), spec=JobSpec.model_validate(spec("https://127.1/"))
        )
    assert e.value.field == "environment.ref"


def test_a_bad_allow_list_setting_fails_loudly(settings, as_alice):
    settings.OPENTINKER_EGRESS_ALLOW = {"team:acme": ["10.0.0.0/8"]}
    with pytest.raises(ValueError, match="unknown scope"):
        as_alice.post(JOBS, spec("https://env.example/x"), format="json")
