"""The hot path's shortcuts write exactly what DRF's generic code writes.

- JobOutputSerializer builds each job's dict by hand: equal to DRF's ModelSerializer output for the same job.
- api.renderers.JSONRenderer (orjson): the same bytes as DRF's JSONRenderer, falling back to it for anything
  orjson refuses or for indented output.
"""

from __future__ import annotations

import datetime
import decimal
import uuid
from zoneinfo import ZoneInfo

import pytest
from django.utils.translation import gettext_lazy
from rest_framework.renderers import JSONRenderer as DrfJSONRenderer

from api.renderers import JSONRenderer
from api.views.jobs import JobOutputSerializer
from opentinker.spec import example_rl_spec
from portal.models import Job

SPEC = example_rl_spec().model_dump(mode="json")


@pytest.mark.django_db
def test_a_job_is_written_as_the_model_serializer_writes_it(as_alice, as_bob, bob):
    assert as_alice.post("/api/v1/jobs", {**SPEC, "name": "plain"}, format="json").status_code == 201
    assert as_bob.post("/api/v1/jobs", {**SPEC, "name": "full"}, format="json").status_code == 201
    full = Job.objects.get(name="full")
    started = datetime.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=datetime.UTC)
    Job.objects.filter(pk=full.pk).update(
        pool="gpu-a",
        started_at=started,
        finished_at=started.astimezone(ZoneInfo("Asia/Tokyo")),
        state_reason="ünïcode \u2028 reason",
        priority=-3,
        gpus=2,
        attempt=4,
    )
    bob.delete()  # created_by becomes NULL
    jobs = list(Job.objects.select_related("organization", "created_by").order_by("name"))
    assert [j.name for j in jobs] == ["full", "plain"] and jobs[0].created_by is None
    for job in jobs:
        s = JobOutputSerializer(job)
        assert s.data == s.generic_representation(job)
        assert list(s.data) == list(s.generic_representation(job))  # the same keys in the same order
    listed = as_alice.get("/api/v1/jobs?limit=20").json()["results"]
    assert [j["name"] for j in listed] == ["full", "plain"]
    assert listed[0]["started_at"] == "2026-01-02T03:04:05.678901Z"
    assert listed[0]["finished_at"] == "2026-01-02T03:04:05.678901Z"  # in UTC, as DRF writes it
    assert listed[0]["created_by"] is None and listed[1]["created_by"] == "alice"
    assert listed[0]["pool"] == "gpu-a" and listed[1]["pool"] is None


VALUES = {
    "id": uuid.UUID("12345678-1234-5678-1234-567812345678"),
    "utc": datetime.datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=datetime.UTC),
    "tokyo": datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=ZoneInfo("Asia/Tokyo")),
    "naive": datetime.datetime(2026, 1, 2, 3, 4, 5),
    "date": datetime.date(2026, 1, 2),
    "money": decimal.Decimal("1.25"),
    "lazy": gettext_lazy("not found"),
    "text": 'ünïcode \u2028 \u2029 "quoted" \n',
    "numbers": [0, -1, 1.5, 1e300, 2**63 - 1, True, None],
    "nested": {"a": [{"b": ()}], 3: "int key"},
}


@pytest.mark.parametrize("key", sorted(VALUES))
def test_the_renderer_writes_drf_bytes(key):
    data = {"value": VALUES[key]}
    assert JSONRenderer().render(data) == DrfJSONRenderer().render(data)


def test_the_renderer_falls_back_to_drf_for_what_orjson_refuses_and_for_indent():
    assert JSONRenderer().render({"big": 2**70}) == DrfJSONRenderer().render({"big": 2**70})
    with pytest.raises(UnicodeEncodeError):  # as DRF's: a lone surrogate cannot be UTF-8
        JSONRenderer().render({"surrogate": "\ud800"})
    indented = "application/json; indent=2"
    assert JSONRenderer().render({"a": [1]}, indented) == DrfJSONRenderer().render({"a": [1]}, indented)
    assert b"\n" in JSONRenderer().render({"a": [1]}, indented)
    assert JSONRenderer().render(None) == b""
