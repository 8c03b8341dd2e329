"""The example recipes `make demo` runs through the platform, as a user would with a real model:

1. write the SFT warm-start data into the demo organization's storage (the object store, `file://` or
   `s3://`) with one of the runtime's data CLIs in a subprocess: the platform never imports gpu_runtime
   (ARCHITECTURE.md), and the runtime is what writes to the store, as it writes checkpoints;
2. submit the SFT job;
3. when it has succeeded, submit stage 2 with `model.base` = the warm start's last checkpoint.

Two examples of that one shape:
- `ExampleRecipe` (the default): arithmetic, tiny-qwen2 from random weights; SFT takes greedy accuracy from
  0 to ~0.4, GRPO then to >= 0.8. The recipe is `opentinker.spec.example_sft_spec` / `example_grpo_spec`, the
  one tests/gpu_runtime/test_learning.py shows learning.
- `MultiAgentRecipe` (`make demo DEMO_ARGS=--multi-agent`): the rule-based player's tic-tac-toe games, then
  two policies from that warm start (`example_multiagent_spec`): `alice` (full fine-tuning) and `bob` (LoRA)
  co-trained against each other, each evaluated against the rule-based player in both seats during the job
  (the job page's "Win or draw vs the rule-based player").

Everything goes through the SDK and the REST API; no Django, no torch here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any, ClassVar

from opentinker.client import Client
from opentinker.spec import (
    EXAMPLE_ENV_CONFIG,
    EXAMPLE_MULTIAGENT_ENV_CONFIG,
    JobSpec,
    JobState,
    example_grpo_spec,
    example_multiagent_sft_spec,
    example_multiagent_spec,
    example_sft_spec,
)


class ExampleRecipe:
    """The arithmetic example; a subclass is another example by its class attributes and its two specs."""

    sft_examples: ClassVar[int] = 2000
    data_cli: ClassVar[tuple[str, ...]] = ("gpu_runtime.data.arithmetic_sft",)  # module, then its own options
    dataset: ClassVar[str] = "arithmetic-sft.jsonl"
    env_config: ClassVar[dict[str, Any]] = EXAMPLE_ENV_CONFIG
    key: ClassVar[str] = "demo"  # idempotency keys `<key>-sft-<time>` and `<key>-<stage2_key>-<sft id>`
    stage2_key: ClassVar[str] = "grpo"
    stage1_text: ClassVar[str] = "SFT warm start, queued"
    stage2_text: ClassVar[str] = "GRPO from its checkpoint, submitted when stage 1 succeeds"
    stage2_name: ClassVar[str] = "GRPO"

    def __init__(
        self,
        url: str,
        token: str,
        store: str,
        org: str,
        *,
        steps: int | None = None,
        s3_endpoint: str | None = None,
    ) -> None:
        self.url, self.token = url, token
        self.s3_endpoint = s3_endpoint  # S3_ENDPOINT_URL of an S3-compatible store (MinIO, ...)
        self.org_prefix = f"{store.rstrip('/')}/orgs/{org}"
        self.steps = steps  # override both stages' steps (tests, a quick look)
        self.sft_id: str | None = None
        self.grpo_id: str | None = None  # stage 2's job, whatever its algorithm
        self.done = False

    def sft_spec(self, dataset_uri: str) -> JobSpec:
        return example_sft_spec(dataset_uri)

    def stage2_spec(self, checkpoint_uri: str) -> JobSpec:
        return example_grpo_spec(checkpoint_uri)

    def _client(self) -> Client:
        return Client(self.url, self.token)

    def _steps(self, spec: JobSpec) -> JobSpec:
        if self.steps is None:
            return spec
        return spec.model_copy(update={"algorithm": spec.algorithm.with_steps(self.steps)})

    def write_dataset(self) -> str:
        """Generate the warm-start data straight into the store, in a runtime process."""
        uri = f"{self.org_prefix}/datasets/{self.dataset}"
        module, *options = self.data_cli
        cmd = [sys.executable, "-m", module, uri, *options]
        cmd += ["--n", str(self.sft_examples), "--seed", "0", "--config", json.dumps(self.env_config)]
        env = dict(os.environ, **({"AWS_ENDPOINT_URL": self.s3_endpoint} if self.s3_endpoint else {}))
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            reason = done.stderr.strip()[-2000:]
            raise RuntimeError(f"could not write the example's SFT data to {uri}: {reason}")
        return uri

    def start(self) -> str:
        """Write the data and submit the warm start; returns the lines to print."""
        if not self.org_prefix.startswith(("file://", "s3://")):
            raise RuntimeError(f"the demo's example needs a file:// or s3:// store, not {self.org_prefix}")
        spec = self._steps(self.sft_spec(self.write_dataset()))
        with self._client() as client:
            job = client.jobs.submit(spec, idempotency_key=f"{self.key}-sft-{time.time_ns()}")
        self.sft_id = job.id
        return (
            f"  Example, stage 1:  {job.name} ({job.id}): {self.stage1_text}\n"
            f"  Example, stage 2:  {self.stage2_text}\n"
            f"                     follow them with  opentinker jobs watch <id>\n"
        )

    def poll(self) -> str | None:
        """Once the warm start has succeeded, submit stage 2 from its last checkpoint; a line to print."""
        if self.done or self.sft_id is None:
            return None
        with self._client() as client:
            sft = client.jobs.get(self.sft_id)
            if not sft.is_terminal:
                return None
            self.done = True
            not_submitted = f"{self.stage2_name} not submitted"
            if sft.state is not JobState.SUCCEEDED:
                return f"  Example: the SFT warm start ended {sft.state}; {not_submitted}"
            checkpoints = client.jobs.checkpoints(self.sft_id)
            last = max(checkpoints, key=lambda c: c.step or 0) if checkpoints else None
            if last is None or not last.uri:
                return f"  Example: the SFT warm start left no checkpoint; {not_submitted}"
            spec = self._steps(self.stage2_spec(last.uri))
            job = client.jobs.submit(spec, idempotency_key=f"{self.key}-{self.stage2_key}-{self.sft_id}")
        self.grpo_id = job.id
        return f"  Example, stage 2:  {job.name} ({job.id}) queued, from {last.uri}"


class MultiAgentRecipe(ExampleRecipe):
    """The two-policy tic-tac-toe example."""

    sft_examples = 3000
    data_cli = ("gpu_runtime.data.board_sft", "--game", "tic-tac-toe")
    dataset = "tic-tac-toe-sft.jsonl"
    env_config = EXAMPLE_MULTIAGENT_ENV_CONFIG
    key = "demo-ma"
    stage2_key = "rl"
    stage1_text = "SFT on the rule player's moves, queued"
    stage2_text = "two policies co-trained from its checkpoint, once stage 1 succeeds"
    stage2_name = "stage 2"

    def sft_spec(self, dataset_uri: str) -> JobSpec:
        return example_multiagent_sft_spec(dataset_uri)

    def stage2_spec(self, checkpoint_uri: str) -> JobSpec:
        return example_multiagent_spec(checkpoint_uri)
