"""The demo's example recipe writes its SFT warm-start data through the object-store layer: to a `file://`
store and to an `s3://` one (moto's S3 server over HTTP), the same bytes, where the runtime reads them."""

from __future__ import annotations

import json

import pytest

from devstack.recipes import ExampleRecipe
from gpu_runtime.data.arithmetic_sft import arithmetic_conversations
from opentinker.spec import EXAMPLE_ENV_CONFIG


def check_dataset(data: bytes) -> None:
    lines = data.decode().splitlines()
    assert len(lines) == ExampleRecipe.sft_examples == 2000
    first = json.loads(lines[0])
    assert first == {"messages": arithmetic_conversations(1, seed=0, **EXAMPLE_ENV_CONFIG)[0]}
    assert [m["role"] for m in first["messages"]][-1] == "assistant"


def test_the_sft_data_goes_to_an_s3_store_where_the_runtime_reads_it(s3_store, monkeypatch, tmp_path):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)  # given to the recipe (S3_ENDPOINT_URL)
    recipe = ExampleRecipe(
        "http://127.0.0.1:9", "otk_unused", "s3://otk-store/store/", "acme", s3_endpoint=s3_store.endpoint
    )
    uri = recipe.write_dataset()
    assert uri == "s3://otk-store/store/orgs/acme/datasets/arithmetic-sft.jsonl"
    listed = s3_store.client.list_objects_v2(Bucket="otk-store")["Contents"]
    assert [o["Key"] for o in listed] == ["store/orgs/acme/datasets/arithmetic-sft.jsonl"]
    data = s3_store.client.get_object(Bucket="otk-store", Key=listed[0]["Key"])["Body"].read()
    check_dataset(data)

    # The same bytes as on a file:// store, and nothing else left there.
    local = ExampleRecipe("http://127.0.0.1:9", "otk_unused", f"file://{tmp_path}/objects", "acme")
    path = tmp_path / "objects/orgs/acme/datasets/arithmetic-sft.jsonl"
    assert local.write_dataset() == f"file://{path}"
    assert path.read_bytes() == data
    assert [p.name for p in path.parent.iterdir()] == ["arithmetic-sft.jsonl"]

    # What the SFT job's runtime does with the spec's dataset URI.
    from gpu_runtime.data.sft import load_chat_jsonl

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_store.endpoint)
    conversations = load_chat_jsonl(uri)
    assert len(conversations) == 2000


def test_an_unsupported_store_is_refused_before_anything_is_written():
    recipe = ExampleRecipe("http://127.0.0.1:9", "otk_unused", "gs://bucket/store", "acme")
    with pytest.raises(
        RuntimeError, match=r"needs a file:// or s3:// store, not gs://bucket/store/orgs/acme"
    ):
        recipe.start()
