"""vLLM rollout engine (GPU; optional `vllm` extra).

NOT EXERCISED BY THE PROJECT'S TESTS: vLLM is not installed on the machines this project is tested on. It is
written against vLLM's documented offline API (`LLM.generate` with `TokensPrompt`,
`SamplingParams(logprobs=0)`
returning the sampled token's log-prob, `LLM.sleep` / `LLM.wake_up` for colocation) and kept thin on purpose.
Weights are pushed in place through the model runner's `load_weights`, as RL frameworks do with vLLM.
"""

from __future__ import annotations

from typing import Any

import torch

from gpu_runtime.rollout.base import GenerateResult, RolloutEngine, SamplingParams


class VLLMEngine(RolloutEngine):
    def __init__(self, model_path: str, *, gpu_memory_utilization: float = 0.5, **kwargs: Any) -> None:
        from vllm import LLM  # lazy: the extra is optional and GPU-only

        self.llm = LLM(
            model=model_path,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_sleep_mode=True,
            **kwargs,
        )

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> GenerateResult:
        from vllm import SamplingParams as VSampling
        from vllm.inputs import TokensPrompt

        # vLLM reports log-probs of the processed distribution when asked; 0 extra candidates = sampled only.
        params = VSampling(
            n=1,
            max_tokens=sampling.max_new_tokens,
            temperature=0.0 if sampling.greedy else sampling.temperature,
            top_p=sampling.top_p,
            stop_token_ids=list(sampling.stop_ids),
            logprobs=0,
            logprobs_mode="processed_logprobs",
        )
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        result = GenerateResult([], [], [])
        for o in outs:
            c = o.outputs[0]
            ids = list(c.token_ids)
            lps = [d[t].logprob for t, d in zip(ids, c.logprobs or [], strict=False)]
            result.token_ids.append(ids)
            result.logprobs.append(lps)
            result.finished.append(c.finish_reason == "stop")
        return result

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        model.load_weights(weights=list(state_dict.items()))

    def sleep(self) -> None:
        self.llm.sleep(level=1)

    def wake_up(self) -> None:
        self.llm.wake_up()
