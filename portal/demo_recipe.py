"""The example recipe `make demo` runs through the platform, as a user would with a real model:

1. write the SFT warm-start data (arithmetic conversations, chat JSONL) into the demo organization's storage
   (the object store, `file://` or `s3://`, through gpu_runtime.storage as the runtime writes checkpoints);
2. submit the SFT job (tiny-qwen2 from random weights: greedy accuracy 0 -> ~0.4);
3. when it has succeeded, submit GRPO with `model.base` = the warm start's last checkpoint (-> >= 0.8).

The recipe is `opentinker.spec.example_sft_spec` / `example_grpo_spec`, the one tests/gpu_runtime/
test_learning.py shows learning. Everything goes through the SDK and the REST API; no Django, no torch here
(the data is made by `python -m gpu_runtime.data.arithmetic_sft` in a subprocess, then stored).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

SFT_EXAMPLES = 2000


class ExampleRecipe:
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
        self.grpo_id: str | None = None
        self.done = False

    def _client(self):
        from opentinker.client import Client

        return Client(self.url, self.token)

    def _steps(self, spec):
        if self.steps is None:
            return spec
        return spec.model_copy(update={"algorithm": spec.algorithm.with_steps(self.steps)})

    def write_dataset(self) -> str:
        """Generate the warm-start data straight into the store, in a runtime process: the platform never
        imports gpu_runtime (ARCHITECTURE.md), and the runtime is what writes to the store."""
        from opentinker.spec import EXAMPLE_ENV_CONFIG

        uri = f"{self.org_prefix}/datasets/arithmetic-sft.jsonl"
        cmd = [sys.executable, "-m", "gpu_runtime.data.arithmetic_sft", uri]
        cmd += ["--n", str(SFT_EXAMPLES), "--seed", "0", "--config", json.dumps(EXAMPLE_ENV_CONFIG)]
        env = dict(os.environ, **({"AWS_ENDPOINT_URL": self.s3_endpoint} if self.s3_endpoint else {}))
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            reason = done.stderr.strip()[-2000:]
            raise RuntimeError(f"could not write the example's SFT data to {uri}: {reason}")
        return uri

    def start(self) -> str:
        """Write the data and submit the warm start; returns the lines to print."""
        from opentinker.spec import example_sft_spec

        if not self.org_prefix.startswith(("file://", "s3://")):
            raise RuntimeError(f"the demo's example needs a file:// or s3:// store, not {self.org_prefix}")
        spec = self._steps(example_sft_spec(self.write_dataset()))
        with self._client() as client:
            job = client.jobs.submit(spec, idempotency_key=f"demo-sft-{time.time_ns()}")
        self.sft_id = job.id
        return (
            f"  Example, stage 1:  {job.name} ({job.id}): SFT warm start, queued\n"
            "  Example, stage 2:  GRPO from its checkpoint, submitted when stage 1 succeeds\n"
            f"                     follow them with  opentinker jobs watch <id>\n"
        )

    def poll(self) -> str | None:
        """After the warm start succeeded, submit GRPO from its last checkpoint; returns a line to print."""
        if self.done or self.sft_id is None:
            return None
        from opentinker.spec import JobState, example_grpo_spec

        with self._client() as client:
            sft = client.jobs.get(self.sft_id)
            if not sft.is_terminal:
                return None
            self.done = True
            if sft.state is not JobState.SUCCEEDED:
                return f"  Example: the SFT warm start ended {sft.state.value}; GRPO not submitted"
            checkpoints = client.jobs.checkpoints(self.sft_id)
            if not checkpoints:
                return "  Example: the SFT warm start left no checkpoint; GRPO not submitted"
            last = max(checkpoints, key=lambda c: c.step or 0)
            spec = self._steps(example_grpo_spec(last.uri))
            job = client.jobs.submit(spec, idempotency_key=f"demo-grpo-{self.sft_id}")
        self.grpo_id = job.id
        return f"  Example, stage 2:  {job.name} ({job.id}) queued, from {last.uri}"
