"""The model server's engine core (issue 16): one frozen base model, many clients' LoRA adapters, Tinker's
primitives (`forward`, `forward_backward`, `optim_step`, sampling, save/load) as queued, seq-ordered calls.
No transport here: the Tinker-compatible API, its futures and queue come on top of `ModelServer`."""

from gpu_runtime.model_server.engine import ModelInfo, ModelServer
from gpu_runtime.model_server.types import (
    AdamParams,
    ComputeLogprobs,
    ComputeLogprobsResult,
    Datum,
    ForwardBackward,
    ForwardBackwardResult,
    LoadState,
    LoadStateResult,
    LoraConfig,
    ModelServerError,
    OptimStep,
    OptimStepResult,
    Outcome,
    Sample,
    SampledSequence,
    SampleResult,
    SamplingParams,
    SaveState,
    SaveStateResult,
)

__all__ = [
    "AdamParams",
    "ComputeLogprobs",
    "ComputeLogprobsResult",
    "Datum",
    "ForwardBackward",
    "ForwardBackwardResult",
    "LoadState",
    "LoadStateResult",
    "LoraConfig",
    "ModelInfo",
    "ModelServer",
    "ModelServerError",
    "OptimStep",
    "OptimStepResult",
    "Outcome",
    "Sample",
    "SampleResult",
    "SampledSequence",
    "SamplingParams",
    "SaveState",
    "SaveStateResult",
]
