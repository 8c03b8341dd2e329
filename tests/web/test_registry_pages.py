"""The portal's models-and-datasets pages: the organization's models with their validation, datasets with
a preview (columns, counts, first rows, escaped); another organization's are a 404 and never listed."""

from __future__ import annotations

import pytest

from env_registry.models import DatasetVersion, ModelVersion, RegisteredDataset, RegisteredModel
from tests.web.pages import signed_in

pytestmark = pytest.mark.django_db


@pytest.fixture
def acme_registry(acme, alice):
    model = RegisteredModel.objects.create(organization=acme, name="tiny", description="our small one")
    ModelVersion.objects.create(
        model=model,
        version=1,
        uri="file:///x",
        status="invalid",
        validation_error="the tokenizer does not load: boom",
        info={"model_type": "qwen2", "parameters": 28960, "dtypes": ["float32"]},
        size_bytes=2048,
        uploaded_by=alice,
    )
    ModelVersion.objects.create(
        model=model,
        version=2,
        uri="file:///y",
        status="valid",
        info={"model_type": "qwen2", "parameters": 28960},
    )
    dataset = RegisteredDataset.objects.create(organization=acme, name="arith")
    DatasetVersion.objects.create(
        dataset=dataset,
        version=1,
        format="parquet",
        uri="file:///z",
        num_rows=12,
        columns=[{"name": "question", "type": "string"}, {"name": "answer", "type": "string"}],
        preview=[
            {"question": "What is 1 + 1?", "answer": "2"},
            {"question": "<script>x</script>", "answer": "3"},
        ],
    )


def test_index_model_and_dataset_pages(alice, acme, acme_registry):
    client = signed_in(alice, acme)
    html = client.get("/registry/").content.decode()
    assert "acme/tiny" in html and "@2" in html and "acme/arith" in html and "Parquet, 12 rows" in html
    html = client.get("/registry/models/tiny/").content.decode()
    assert "acme/tiny@1" in html and "acme/tiny@2" in html and "28960" in html
    assert "the tokenizer does not load: boom" in html and "Failed validation" in html
    html = client.get("/registry/datasets/arith/").content.decode()
    assert '<strong data-testid="num-rows">12</strong>' in html
    assert "<td>What is 1 + 1?</td><td>2</td>" in html
    assert "&lt;script&gt;x&lt;/script&gt;" in html and "<script>x</script>" not in html


def test_another_organization_sees_none_of_it(charlie, globex, acme_registry):
    client = signed_in(charlie, globex)
    html = client.get("/registry/").content.decode()
    assert "No model yet." in html and "No dataset yet." in html and "acme/" not in html
    assert client.get("/registry/models/tiny/").status_code == 404
    assert client.get("/registry/datasets/arith/").status_code == 404


def test_signed_out_is_sent_to_sign_in(client, acme_registry):
    resp = client.get("/registry/models/tiny/")
    assert resp.status_code == 302 and "/accounts/login/" in resp["Location"]
