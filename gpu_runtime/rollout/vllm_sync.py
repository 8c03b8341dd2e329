"""The weight-sync extension vLLM mixes into its worker (`worker_extension_cls`), reached by `collective_rpc`.

Kept apart from vllm.py because vLLM imports it by name inside its worker; it imports nothing of vLLM.
"""

from __future__ import annotations

from typing import Any

from safetensors.torch import load as load_safetensors


class WeightSync:
    model_runner: Any  # the vLLM worker's, which this class is mixed into

    def opentinker_load_safetensors(self, blob: bytes) -> None:
        """Replace the weights in place from a safetensors-serialised state dict (Hugging Face names).
        The runner's `reload_weights` goes through the model's loader, which repacks weights as the CPU
        backend needs; loading into the parameters directly does not."""
        weights = load_safetensors(blob)
        self.model_runner.reload_weights(weights_iterator=iter(weights.items()), is_checkpoint_format=True)
