"""The one forward every call shares: log-probabilities of target tokens under the routed adapters."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from gpu_runtime.model_server.lora import LoraAdapter, MultiLoraModel, route_rows


def token_logprobs(
    host: MultiLoraModel,
    inputs: Sequence[Sequence[int]],
    targets: Sequence[Tensor],
    adapters: Sequence[LoraAdapter | None],
    temperatures: Sequence[float] | None = None,
) -> list[Tensor]:
    """Per row, log p(targets[i][t] | inputs[i][:t+1]) under the base plus that row's adapter, in ONE forward
    pass (rows right-padded; causal attention never lets a real token see the padding after it). Returns
    float32 tensors of each row's length, differentiable wrt the adapters' parameters when grad is enabled.
    `temperatures`: per row, p = softmax(logits / T) (None: T = 1)."""
    device = host.device
    width = max(len(x) for x in inputs)
    ids = torch.zeros((len(inputs), width), dtype=torch.long)
    tgt = torch.zeros((len(inputs), width), dtype=torch.long)
    for i, (x, y) in enumerate(zip(inputs, targets, strict=True)):
        ids[i, : len(x)] = torch.as_tensor(list(x), dtype=torch.long)
        tgt[i, : len(x)] = y
    ids, tgt = ids.to(device), tgt.to(device)
    with host.router.use(route_rows(adapters, device)):
        logits = host.model(input_ids=ids, use_cache=False).logits
    z = logits.float()
    if temperatures is not None:
        z = z / torch.tensor(list(temperatures), dtype=z.dtype, device=device).view(-1, 1, 1)
    lp = z.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, -1)
    return [lp[i, : len(x)] for i, x in enumerate(inputs)]
