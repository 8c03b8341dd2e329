"""End to end: a model made with transformers and a Parquet dataset pushed through the API drive an SFT job
(model.base = acme/tiny@1, dataset.uri = acme/arith@1 with a column mapping, as the platform pins them), and
the job's checkpoint round-trips: it loads with transformers, keeps the uploaded tokenizer and architecture,
and goes back into the registry as acme/tiny@2, a valid model holding exactly the trained weights, which
then drives an RL job (model.base = acme/tiny@latest).

The job runs in this process (Controller + LocalGroup, as tests/gpu_runtime/test_sft.py does), on the spec
the API stored: the same JobSpec a pool's runtime would get.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
from safetensors.torch import load_file

from env_registry.models import ModelVersion
from gpu_runtime.controller import EXIT_OK, Controller, LocalGroup
from gpu_runtime.data.arithmetic_sft import arithmetic_conversations
from gpu_runtime.model_check import check_model_dir
from gpu_runtime.models import load_model, load_tokenizer
from opentinker.spec import JobSpec
from portal.models import Job
from tests.api.test_registry import V1, parquet_bytes, push, tiny_model_files
from tests.gpu_runtime.test_controller import ListSink

pytestmark = [pytest.mark.django_db, pytest.mark.slow]

CHAT = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]


@pytest.mark.usefixtures("builtin_envs")
def test_pushed_model_and_parquet_dataset_train_an_sft_job_and_the_checkpoint_round_trips(
    as_alice, settings, tmp_path
):
    store = tmp_path / "objects"
    settings.OBJECT_STORE_URL = f"file://{store}"
    uploaded = tiny_model_files(seed=3)
    resp = push(as_alice, "model", "tiny", uploaded)
    assert resp.status_code == 201 and resp.json()["model"]["status"] == "valid", resp.content
    convs = arithmetic_conversations(16, seed=0, max_operand=9)
    rows = [{"sys": c[0]["content"], "q": c[1]["content"], "a": c[2]["content"]} for c in convs]
    resp = push(as_alice, "dataset", "arith", {"arith.parquet": parquet_bytes(rows)})
    assert resp.status_code == 201 and resp.json()["dataset"]["num_rows"] == 16

    job_body = {
        "kind": "sft",
        "model": {"base": "acme/tiny@1"},
        "dataset": {"uri": "acme/arith@1", "columns": {"system": "sys", "prompt": "q", "completion": "a"}},
        "algorithm": {
            "name": "sft",
            "steps": 2,
            "batch_size": 4,
            "micro_batch_size": 2,
            "learning_rate": 1e-2,
        },
        "checkpoint": {"every_steps": 2, "keep_last": 2},
        "seed": 1,
    }
    resp = as_alice.post(f"{V1}/jobs", job_body, format="json")
    assert resp.status_code == 201, resp.content
    spec = JobSpec.model_validate(Job.objects.get(pk=resp.json()["id"]).spec)
    model_uri = f"file://{store}/orgs/acme/models/tiny/1"
    assert (spec.model.base, spec.model.registry_ref) == (model_uri, "acme/tiny@1")
    assert spec.dataset is not None and spec.dataset.registry_ref == "acme/arith@1"

    sink = ListSink()
    prefix = f"file://{store}/orgs/acme/jobs/e2e"
    result = Controller(spec, sink, LocalGroup(spec), prefix).run()
    assert result.exit_code == EXIT_OK and result.step == 2
    steps = sink.metric_steps()
    assert sorted(steps) == [1, 2]
    # Assistant tokens only: a 1-2 digit answer and the end of turn, for each of the 4 examples.
    assert all(8 <= steps[s]["tokens/trained"] <= 12 for s in steps)
    [ckpt] = [r for r in sink.records if r["type"] == "checkpoint"]

    # The checkpoint loads with transformers: the uploaded tokenizer and architecture, trained weights.
    trained = load_model(ckpt["uri"])
    base_tok = load_tokenizer(model_uri)
    assert trained.tokenizer.apply_chat_template(CHAT, tokenize=True, return_dict=False) == (
        base_tok.apply_chat_template(CHAT, tokenize=True, return_dict=False)
    )
    assert trained.model.config.to_dict()["hidden_size"] == 32
    assert trained.model.config.num_hidden_layers == 2
    before = load_file(str(store / "orgs/acme/models/tiny/1/model.safetensors"))
    after = {k: v for k, v in trained.model.state_dict().items() if k in before}
    assert sorted(after) == sorted(before)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # SFT moved the weights

    # ... and goes back into the registry as the next version (trainer state left out, as a download does).
    ckpt_dir = Path(urlparse(ckpt["uri"]).path)
    export = tmp_path / "export"
    shutil.copytree(ckpt_dir, export, ignore=shutil.ignore_patterns("trainer_state.pt"))
    files = {p.name: p.read_bytes() for p in export.iterdir() if p.is_file()}
    settings.ENV_VALIDATION_MODE = "celery"  # the sandbox ran above; checked in process here
    resp = push(as_alice, "model", "tiny", files)
    assert resp.status_code == 201 and resp.json()["ref"] == "acme/tiny@2", resp.content
    v2 = ModelVersion.objects.get(version=2)
    report = check_model_dir(urlparse(v2.uri).path)
    assert report["parameters"] == 28960 and report["model_type"] == "qwen2"
    again = load_model(v2.uri)
    for k, v in trained.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[k], v), k

    # The trained model, now a registry version, is the base of an RL job (one GRPO step on arithmetic).
    ModelVersion.objects.filter(pk=v2.pk).update(status="valid")
    rl_body = {
        "kind": "rl",
        "model": {"base": "acme/tiny@latest"},
        "environment": {"ref": "opentinker/arithmetic@1.0.0", "config": {"max_operand": 9}},
        "algorithm": {"name": "grpo", "steps": 1, "batch_size": 2, "group_size": 2, "max_new_tokens": 4},
        "seed": 1,
    }
    resp = as_alice.post(f"{V1}/jobs", rl_body, format="json")
    assert resp.status_code == 201, resp.content
    rl_spec = JobSpec.model_validate(Job.objects.get(pk=resp.json()["id"]).spec)
    assert (rl_spec.model.base, rl_spec.model.registry_ref) == (v2.uri, "acme/tiny@2")
    rl_sink = ListSink()
    result = Controller(rl_spec, rl_sink, LocalGroup(rl_spec), f"file://{store}/orgs/acme/jobs/rl").run()
    assert result.exit_code == EXIT_OK and result.step == 1
    assert "reward/mean" in rl_sink.metric_steps()[1]
