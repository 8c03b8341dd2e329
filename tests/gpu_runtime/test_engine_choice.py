"""The job spec's `rollout.engine` picks the rollout engine (gpu_runtime/workers.py `rollout_engine`)."""

from __future__ import annotations

import pydantic
import pytest

from gpu_runtime.rollout.decode import StaticDecodeEngine
from gpu_runtime.rollout.hf import HFEngine
from gpu_runtime.workers import ENGINE_ENV, rollout_engine
from opentinker.spec import JobSpec, example_rl_spec
from tests.gpu_runtime.test_decode import PAD, _model


def _spec(**rollout) -> JobSpec:
    return JobSpec.model_validate({**example_rl_spec().model_dump(), "rollout": rollout})


def test_spec_default_is_auto_and_bad_engines_are_refused():
    assert _spec().rollout.engine == "auto"
    assert _spec(engine="vllm").rollout.engine == "vllm"
    with pytest.raises(pydantic.ValidationError, match=r"rollout\.engine"):
        _spec(engine="sglang")
    with pytest.raises(pydantic.ValidationError, match=r"rollout\.gpus"):
        _spec(engine="hf", gpus=1)


def test_vllm_lora_adapter_needs_vllm_lora_and_one_policy():
    base = example_rl_spec().model_dump()
    lora = {**base, "model": {**base["model"], "lora": {"rank": 8}}}
    assert _spec(engine="vllm").rollout.vllm_lora == "merge"  # the default
    ok = JobSpec.model_validate({**lora, "rollout": {"engine": "vllm", "vllm_lora": "adapter"}})
    assert ok.rollout.vllm_lora == "adapter"
    msg = "rollout.vllm_lora adapter needs rollout.engine vllm and model.lora"
    with pytest.raises(pydantic.ValidationError, match=msg):
        JobSpec.model_validate({**lora, "rollout": {"engine": "static", "vllm_lora": "adapter"}})
    with pytest.raises(pydantic.ValidationError, match=msg):
        _spec(engine="vllm", vllm_lora="adapter")  # no LoRA
    with pytest.raises(pydantic.ValidationError, match=r"rollout\.vllm_lora"):
        _spec(engine="vllm", vllm_lora="served")


def test_choice_and_auto(monkeypatch):
    m = _model()
    monkeypatch.delenv(ENGINE_ENV, raising=False)
    assert type(rollout_engine(m, pad_id=PAD, device="cpu")) is StaticDecodeEngine  # auto: our loop
    assert type(rollout_engine(m, pad_id=PAD, device="cpu", choice="hf")) is HFEngine
    assert type(rollout_engine(m, pad_id=PAD, device="cpu", choice="static")) is StaticDecodeEngine
    monkeypatch.setenv(ENGINE_ENV, "hf")  # what auto means
    assert type(rollout_engine(m, pad_id=PAD, device="cpu")) is HFEngine
    assert type(rollout_engine(m, pad_id=PAD, device="cpu", choice="static")) is StaticDecodeEngine
    monkeypatch.setenv(ENGINE_ENV, "fast")
    with pytest.raises(ValueError, match="OPENTINKER_ROLLOUT_ENGINE must be one of static, hf, vllm"):
        rollout_engine(m, pad_id=PAD, device="cpu")
