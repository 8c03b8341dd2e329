"""An rl job whose prompts are an organization's registry dataset (three actors): alice (owner) and bob
(member) of acme submit `dataset.uri = acme/prompts@latest`, pinned to the version's files at submission;
charlie (globex) cannot name acme's dataset, by reference or by its storage URI, and acme cannot name his."""

from __future__ import annotations

import pytest

from env_registry.models import DatasetVersion
from opentinker.spec import JobSpec
from portal.models import Job
from tests.api.test_registry import V1, error_of, parquet_bytes, push

pytestmark = pytest.mark.django_db

ROWS = [{"question": f"{i}+{i}=", "solution": 2 * i} for i in range(8)]
COLUMNS = {"prompt": "question", "answer": "solution"}


def rl_job(dataset: str, **over) -> dict:
    return {
        "kind": "rl",
        "model": {"base": "tiny-qwen2"},
        "environment": {"ref": "opentinker/answer-match@latest"},
        "dataset": {"uri": dataset, "columns": COLUMNS, "eval_rows": 2},
        "algorithm": {"name": "grpo", "steps": 2, "batch_size": 2, "group_size": 2, "max_new_tokens": 4},
    } | over


@pytest.fixture
def store(settings, tmp_path):
    settings.OBJECT_STORE_URL = f"file://{tmp_path}/objects"
    return tmp_path / "objects"


def test_an_rl_job_takes_its_prompts_from_the_organizations_dataset(as_alice, as_bob, as_charlie, store):
    assert push(as_alice, "dataset", "prompts", {"p.parquet": parquet_bytes(ROWS)}).status_code == 201
    assert push(as_alice, "dataset", "prompts", {"p.parquet": parquet_bytes(ROWS[:6])}).status_code == 201
    assert push(as_charlie, "dataset", "secret", {"s.parquet": parquet_bytes(ROWS)}).status_code == 201

    for client in (as_alice, as_bob):
        resp = client.post(f"{V1}/jobs", rl_job("acme/prompts@latest"), format="json")
        assert resp.status_code == 201, resp.content
        spec = JobSpec.model_validate(Job.objects.get(pk=resp.json()["id"]).spec)
        assert spec.dataset.uri == f"file://{store}/orgs/acme/datasets/prompts/2"
        assert (spec.dataset.registry_ref, spec.dataset.columns, spec.dataset.eval_rows) == (
            "acme/prompts@2",
            COLUMNS,
            2,
        )
        assert spec.environment.ref == "opentinker/answer-match@1.0.0"  # pinned as any environment
    pinned = as_alice.post(f"{V1}/jobs", rl_job("acme/prompts@1"), format="json")
    assert pinned.status_code == 201
    assert Job.objects.get(pk=pinned.json()["id"]).spec["dataset"]["registry_ref"] == "acme/prompts@1"

    # The outsider can name neither acme's dataset nor its files; acme cannot name globex's either.
    resp = as_charlie.post(f"{V1}/jobs", rl_job("acme/prompts@1"), format="json")
    assert resp.status_code == 400 and "no dataset acme/prompts in your organization" in error_of(resp)
    raw = f"file://{store}/orgs/acme/datasets/prompts/1"
    resp = as_charlie.post(f"{V1}/jobs", rl_job(raw), format="json")
    assert resp.status_code == 400 and "is not in your organization's storage" in error_of(resp)
    resp = as_alice.post(f"{V1}/jobs", rl_job("globex/secret@latest"), format="json")
    assert resp.status_code == 400 and "no dataset globex/secret in your organization" in error_of(resp)
    assert Job.objects.filter(organization__slug="globex").count() == 0
    assert Job.objects.count() == 3


def test_a_prompt_dataset_the_job_cannot_use_is_a_clear_400(as_alice, store):
    assert push(as_alice, "dataset", "prompts", {"p.parquet": parquet_bytes(ROWS)}).status_code == 201
    cases = [
        (rl_job("acme/prompts@1", environment={"ref": "opentinker/arithmetic@1.0.0"}),
         "opentinker/arithmetic@1.0.0 does not take a dataset"),
        (rl_job("acme/prompts@1") | {"dataset": {"uri": "acme/prompts@1", "columns": {"prompt": "question"}}},
         "needs `prompt` (or `messages`) and `answer`"),
        (rl_job("acme/prompts@1") | {"dataset": {"uri": "acme/prompts@1", "columns": {"question": "q"}}},
         "unknown role 'question'"),
        (rl_job("acme/prompts@9"), "acme/prompts has no version 9"),
        (rl_job("acme/prompts@1") | {"dataset": {"uri": "acme/prompts@1", "columns": {"prompt": "question",
                                                                                      "answer": "answer"}}},
         "acme/prompts@1 has no column 'answer' (its columns: question, solution)"),
        (rl_job("acme/prompts@latest") | {"dataset": {"uri": "acme/prompts@latest"}},
         "acme/prompts@1 has no `prompt` (or `messages`) and `answer` columns (its columns: question, "
         "solution): map them in dataset.columns"),
        ({"kind": "sft", "model": {"base": "tiny-qwen2"}, "dataset": {"uri": "acme/prompts@1"}},
         "acme/prompts@1 has no `messages` column, nor `prompt` and `completion` columns"),
    ]  # fmt: skip
    for body, message in cases:
        resp = as_alice.post(f"{V1}/jobs", body, format="json")
        assert resp.status_code == 400, body
        assert message in error_of(resp), error_of(resp)
        assert any(f.startswith("dataset") for f in resp.json()["error"]["fields"]), resp.json()
    assert Job.objects.count() == 0 and DatasetVersion.objects.count() == 1
