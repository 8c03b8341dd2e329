"""What goes in and out of the model server core: plain dataclasses, so a queue (and later the Tinker API's
protobuf/JSON layer) can carry them. Tensors are CPU tensors or plain sequences; the core converts and checks.

Names follow the Tinker SDK (`lora_config`, `AdamParams`, `Datum.loss_fn_inputs`, metrics `name:reduction`);
see ../shared/design/TINKER_PROTOCOL.md for the wire side.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

import torch

TensorLike: TypeAlias = torch.Tensor | Sequence[float] | Sequence[int]
ErrorCategory = Literal["user", "server"]


class ModelServerError(Exception):
    """A failed call. `category` is the Tinker SDK's: "user" (the request is wrong: unknown model, bad shapes,
    unknown loss) or "server" (our fault)."""

    def __init__(self, message: str, *, category: ErrorCategory = "user") -> None:
        super().__init__(message)
        self.category: ErrorCategory = category


@dataclass(frozen=True)
class LoraConfig:
    """Tinker's `lora_config`: which parts get an adapter. Unembed = the output projection (`lm_head`)."""

    rank: int = 32
    seed: int | None = None
    train_mlp: bool = True
    train_attn: bool = True
    train_unembed: bool = True


@dataclass(frozen=True)
class AdamParams:
    """Tinker's `AdamParams`, sent with every `optim_step`. weight_decay 0 and grad_clip_norm 0 mean off."""

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0


@dataclass
class Datum:
    """One sequence: `model_input` token ids (chunks already joined) and per-token loss inputs, each of the
    same length as `model_input` (`target_tokens`, `weights`, `logprobs`, `advantages`)."""

    model_input: Sequence[int]
    loss_fn_inputs: dict[str, TensorLike]


@dataclass
class ForwardBackward:
    """`forward_backward` (gradients accumulate until `optim_step`) or, with forward_only, `forward`."""

    data: list[Datum]
    loss_fn: str
    loss_fn_config: dict[str, float] = field(default_factory=dict)
    forward_only: bool = False


@dataclass
class ForwardBackwardResult:
    loss_fn_outputs: list[dict[str, torch.Tensor]]  # per datum: "logprobs", "elementwise_loss" (float32)
    metrics: dict[str, float]  # "loss:sum"


@dataclass
class OptimStep:
    adam_params: AdamParams


@dataclass
class OptimStepResult:
    metrics: dict[str, float]


@dataclass
class SamplingParams:
    """Tinker's sampling params. stop: None = the tokenizer's EOS; token ids, or strings (matched on the
    decoded text); [] = run to max_tokens. temperature 0 = greedy. top_k: the k most likely ids only (-1 or
    0 = off), applied before top_p."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: Sequence[int] | Sequence[str] | None = None


@dataclass
class Sample:
    prompt: Sequence[int]
    num_samples: int
    sampling_params: SamplingParams
    prompt_logprobs: bool = False


@dataclass
class SampledSequence:
    tokens: list[int]  # through the stop token (or the token completing the stop string), inclusive
    logprobs: list[float]
    stop_reason: Literal["stop", "length"]


@dataclass
class SampleResult:
    sequences: list[SampledSequence]
    prompt_logprobs: list[float] | None = None  # one per prompt token, NaN first


@dataclass
class ComputeLogprobs:
    prompt: Sequence[int]


@dataclass
class ComputeLogprobsResult:
    logprobs: list[float]  # one per token, NaN first


@dataclass
class SaveState:
    """`save_weights` (training state: adapter and optimizer) or, with for_sampler, `save_weights_for_sampler`
    (a PEFT adapter directory only). `uri`: file:// or s3://."""

    uri: str
    for_sampler: bool = False


@dataclass
class SaveStateResult:
    uri: str


@dataclass
class LoadState:
    """Replace this model's adapter (and, with optimizer, its Adam state) by a saved state."""

    uri: str
    optimizer: bool = True


@dataclass
class LoadStateResult:
    uri: str


Operation = ForwardBackward | OptimStep | Sample | ComputeLogprobs | SaveState | LoadState
Result = (
    ForwardBackwardResult
    | OptimStepResult
    | SampleResult
    | ComputeLogprobsResult
    | SaveStateResult
    | LoadStateResult
)


@dataclass
class Outcome:
    """What a (model_id, seq_id) call came to: a result or an error (never both)."""

    model_id: str
    seq_id: int
    result: Result | None = None
    error: ModelServerError | None = None
    # Metering: tokens the call processed (input rows; a sample's prompt and completions) and the seconds of
    # model-server time it took (a batched pass's time split by each call's share of its tokens).
    tokens: int = 0
    seconds: float = 0.0

    def unwrap(self) -> Result:
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result
