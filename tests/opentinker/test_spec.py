"""The JobSpec: what is accepted, what is refused, and the field each error names."""

from __future__ import annotations

import pydantic
import pytest

from opentinker.spec import JobKind, JobSpec, JobState, example_rl_spec, parse_environment_ref

BASE = {"kind": "rl", "model": {"base": "tiny-qwen2"}, "environment": {"ref": "opentinker/arithmetic@1.0.0"}}


def errors(data) -> dict[str, str]:
    with pytest.raises(pydantic.ValidationError) as e:
        JobSpec.model_validate(data)
    return {".".join(map(str, err["loc"])): err["msg"] for err in e.value.errors()}


def test_defaults_are_sensible():
    spec = JobSpec.model_validate(BASE)
    assert spec.spec_version == 1
    assert spec.algorithm.name == "grpo" and spec.algorithm.group_size == 4
    assert spec.resources.gpus == 0 and spec.checkpoint.every_steps == 50
    assert spec.display_name == "rl-tiny-qwen2"


def test_round_trip_is_lossless():
    spec = example_rl_spec()
    again = JobSpec.model_validate(spec.model_dump(mode="json"))
    assert again == spec


@pytest.mark.parametrize(
    ("patch", "field", "fragment"),
    [
        ({"kind": "rlhf"}, "kind", "'rl', 'sft' or 'eval'"),
        ({"spec_version": 2}, "spec_version", "1"),
        ({"model": {"base": "gpt-17"}}, "model.base", "unknown model 'gpt-17'"),
        (
            {"model": {"base": "tiny-qwen2", "lora": {"rank": 0}}},
            "model.lora.rank",
            "greater than or equal to 1",
        ),
        ({"environment": {"ref": "arithmetic"}}, "environment.ref", "owner/name@version"),
        ({"environment": {"ref": "a/b@1.0"}}, "environment.ref", "owner/name@version"),
        ({"environment": None}, "environment", "needs an environment"),
        ({"algorithm": {"name": "sft"}}, "algorithm", "not valid for a rl job"),
        ({"algorithm": {"lr": 0.1}}, "algorithm.lr", "Extra inputs are not permitted"),
        ({"algorithm": {"loss_agg": "sum"}}, "algorithm.loss_agg", "token-mean"),
        ({"resources": {"gpus": -1}}, "resources.gpus", "greater than or equal to 0"),
        ({"resources": {"gpus": 10**6}}, "resources.gpus", "less than or equal to 1024"),
        ({"resources": {"gpus": "two"}}, "resources.gpus", "valid integer"),
        ({"resources": {"max_hours": 0}}, "resources.max_hours", "greater than 0"),
        ({"seed": -5}, "seed", "greater than or equal to 0"),
        ({"name": "../../etc"}, "name", "letters, digits"),
        ({"colour": "red"}, "colour", "Extra inputs are not permitted"),
    ],
)
def test_bad_specs_name_the_field(patch, field, fragment):
    found = errors({**BASE, **patch})
    assert field in found, found
    assert fragment in found[field]


def test_sft_needs_a_dataset_and_gets_its_algorithm():
    assert "dataset" in errors({**BASE, "kind": "sft", "environment": None})
    spec = JobSpec.model_validate(
        {**BASE, "kind": "sft", "environment": None, "dataset": {"uri": "s3://b/d.jsonl"}}
    )
    assert spec.algorithm.name == "sft" and spec.kind is JobKind.SFT
    assert "dataset.uri" in errors({**BASE, "kind": "sft", "dataset": {"uri": "/etc/passwd"}})


def test_remote_environment_url_is_accepted():
    spec = JobSpec.model_validate({**BASE, "environment": {"ref": "https://env.example.com/ws"}})
    assert spec.environment.registry_ref is None
    assert "environment.ref" in errors({**BASE, "environment": {"ref": "https://a b"}})


def test_environment_refs_parse():
    ref = parse_environment_ref("opentinker/tic-tac-toe@2.1.0-rc.1")
    assert (ref.owner, ref.name, ref.version) == ("opentinker", "tic-tac-toe", "2.1.0-rc.1")
    assert parse_environment_ref("me/env@latest").version == "latest"
    assert parse_environment_ref("Me/env@1.0.0") is None


def test_states():
    assert [s.value for s in JobState if s.is_terminal] == ["succeeded", "failed", "cancelled"]
    assert str(JobState.RUNNING) == "running"


def test_trainer_ranks_need_a_gpu_or_cpu_each_and_a_share_of_the_samples():
    assert JobSpec.model_validate(BASE).resources.trainer_ranks == 1
    algo = {"name": "grpo", "batch_size": 2, "group_size": 2}  # 4 samples a step
    spec = {**BASE, "algorithm": algo, "resources": {"cpus": 2, "trainer_ranks": 2}}
    assert JobSpec.model_validate(spec).resources.trainer_ranks == 2
    on = {**spec, "resources": {"cpus": 1, "trainer_ranks": 2}}
    cpu = "Value error, trainer_ranks (2) on CPUs need a CPU each: cpus must be at least 2"
    assert errors(on) == {"resources": cpu}
    on = {**spec, "resources": {"gpus": 1, "trainer_ranks": 2}}
    gpu = "Value error, trainer_ranks (2) on GPUs need a GPU each: gpus must be at least 2"
    assert errors(on) == {"resources": gpu}
    on = {**spec, "resources": {"cpus": 8, "trainer_ranks": 5}}
    assert errors(on)["resources"].endswith(
        "trainer_ranks (5) must not exceed a step's samples (4): each rank trains on a share of them"
    )
    # With several rollout workers on GPUs: a GPU per rank and per worker.
    on = {**spec, "resources": {"gpus": 3, "trainer_ranks": 2, "rollout_workers": 2}}
    assert "gpus must be at least 4, not 3" in errors(on)["resources"]
    assert "resources.trainer_ranks" in errors({**BASE, "resources": {"trainer_ranks": 257}})
