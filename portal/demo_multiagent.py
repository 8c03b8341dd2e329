"""The multi-agent example `make demo DEMO_ARGS=--multi-agent` runs through the platform, as a user would:

1. write the SFT warm-start data (tic-tac-toe games of the rule-based player, chat JSONL) into the demo
   organization's storage, with `python -m gpu_runtime.data.board_sft` in a runtime process;
2. submit the SFT job (`opentinker.spec.example_multiagent_sft_spec`);
3. when it has succeeded, submit the two-policy job (`example_multiagent_spec`) from its last checkpoint:
   `alice` (full fine-tuning) and `bob` (LoRA) co-trained against each other, each evaluated against the
   rule-based player in both seats during the job (the job page's "Win or draw vs the rule-based player").

Everything goes through the SDK and the REST API; no Django, no torch here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from portal.demo_recipe import ExampleRecipe

SFT_EXAMPLES = 3000


class MultiAgentRecipe(ExampleRecipe):
    def write_dataset(self) -> str:
        from opentinker.spec import EXAMPLE_MULTIAGENT_ENV_CONFIG

        uri = f"{self.org_prefix}/datasets/tic-tac-toe-sft.jsonl"
        cmd = [sys.executable, "-m", "gpu_runtime.data.board_sft", uri, "--game", "tic-tac-toe"]
        config = json.dumps(EXAMPLE_MULTIAGENT_ENV_CONFIG)
        cmd += ["--n", str(SFT_EXAMPLES), "--seed", "0", "--config", config]
        env = dict(os.environ, **({"AWS_ENDPOINT_URL": self.s3_endpoint} if self.s3_endpoint else {}))
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            reason = done.stderr.strip()[-2000:]
            raise RuntimeError(f"could not write the example's SFT data to {uri}: {reason}")
        return uri

    def start(self) -> str:
        from opentinker.spec import example_multiagent_sft_spec

        if not self.org_prefix.startswith(("file://", "s3://")):
            raise RuntimeError(f"the demo's example needs a file:// or s3:// store, not {self.org_prefix}")
        spec = self._steps(example_multiagent_sft_spec(self.write_dataset()))
        with self._client() as client:
            job = client.jobs.submit(spec, idempotency_key=f"demo-ma-sft-{time.time_ns()}")
        self.sft_id = job.id
        return (
            f"  Example, stage 1:  {job.name} ({job.id}): SFT on the rule player's moves, queued\n"
            "  Example, stage 2:  two policies co-trained from its checkpoint, once stage 1 succeeds\n"
            f"                     follow them with  opentinker jobs watch <id>\n"
        )

    def poll(self) -> str | None:
        if self.done or self.sft_id is None:
            return None
        from opentinker.spec import JobState, example_multiagent_spec

        with self._client() as client:
            sft = client.jobs.get(self.sft_id)
            if not sft.is_terminal:
                return None
            self.done = True
            if sft.state is not JobState.SUCCEEDED:
                return f"  Example: the SFT warm start ended {sft.state.value}; stage 2 not submitted"
            checkpoints = client.jobs.checkpoints(self.sft_id)
            if not checkpoints:
                return "  Example: the SFT warm start left no checkpoint; stage 2 not submitted"
            last = max(checkpoints, key=lambda c: c.step or 0)
            spec = self._steps(example_multiagent_spec(last.uri))
            job = client.jobs.submit(spec, idempotency_key=f"demo-ma-rl-{self.sft_id}")
        self.grpo_id = job.id
        return f"  Example, stage 2:  {job.name} ({job.id}) queued, from {last.uri}"
