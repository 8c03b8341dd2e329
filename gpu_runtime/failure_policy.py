"""The failure policy: a job that cannot run its episodes, or cannot learn, fails with the reason.

CONVENTIONS.md, RL checklist item 9: failed episodes and all-zero advantages are reported and, past a
threshold, fail the job; never a quiet `succeeded`. The thresholds are the spec's `failure_policy`:

- failed episodes: a step whose share of failed episodes (environment errors: unreachable server, crashed
  package, ...) is above `max_episode_failure_rate` is a failing step; `failure_rate_steps` of them in a row
  fail the job, naming what the episodes died of, and so does a last step that ends a run (shorter than
  that) in which every step was failing;
- no learning signal: a step in which every group's samples got the same reward (group baselines then make
  every advantage exactly zero: `groups/zero_std_frac` = 1), or with no sample at all, carries nothing to
  learn from; `zero_signal_steps` of them in a row fail the job;
- eval jobs report how many episodes failed (`eval/episodes_failed` of `eval/episodes`) and fail when none
  completed.

`FailureWatch` sees each step's metrics (the controller calls it after reporting them) and answers the
reason to fail, or None. Pure bookkeeping over the metrics: tested without a model (tests/gpu_runtime/
test_failure_policy.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from opentinker.spec import JobSpec

ErrorsFn = Callable[[], Sequence[str]]


def _causes(errors: Sequence[str]) -> str:
    errors = [e for e in errors if e]
    return f"; episodes failed with: {' | '.join(errors[:3])}"[:900] if errors else ""


class FailureWatch:
    def __init__(self, spec: JobSpec, errors: ErrorsFn = lambda: ()) -> None:
        self.spec = spec
        self.policy = spec.failure_policy
        self.errors = errors  # the latest episodes' error texts (asked only when failing)
        self.failing_steps = 0
        self.no_signal_steps = 0
        self.steps_seen = 0

    def after_step(self, step: int, metrics: dict[str, float]) -> str | None:
        p, a = self.policy, self.spec.algorithm
        total = metrics.get("episodes/total") or float(a.batch_size * a.group_size)
        failed = metrics.get("episodes/failed", 0.0)
        rate = failed / total if total else 0.0
        self.failing_steps = self.failing_steps + 1 if rate > p.max_episode_failure_rate else 0
        self.steps_seen += 1
        # A job shorter than the streak still must not end `succeeded` when every step of it was failing.
        every_step = step >= a.steps and self.failing_steps == self.steps_seen
        if self.failing_steps >= p.failure_rate_steps or (every_step and self.failing_steps > 0):
            return (
                f"episode failure rate above {p.max_episode_failure_rate:.0%} for {self.failing_steps} "
                f"consecutive steps ({failed:.0f} of {total:.0f} episodes failed at step {step}; "
                f"failure_policy.max_episode_failure_rate){_causes(self.errors())}"
            )
        no_signal = metrics.get("groups/zero_std_frac", 1.0) >= 1.0
        self.no_signal_steps = self.no_signal_steps + 1 if no_signal else 0
        if p.zero_signal_steps is not None and self.no_signal_steps >= p.zero_signal_steps:
            reward = metrics.get("reward/mean")
            seen = f", mean reward {reward:g}" if reward is not None else ""
            return (
                f"no learning signal for {self.no_signal_steps} consecutive steps: in every group all "
                f"samples got the same reward (every advantage zero{seen}; "
                "failure_policy.zero_signal_steps)"
            )
        return None

    def after_eval(self, metrics: dict[str, float]) -> str | None:
        # Single-agent eval: eval/episodes(_failed); multi-agent: the games' eval/episodes/{total,failed}.
        n = metrics.get("eval/episodes", metrics.get("eval/episodes/total"))
        failed = metrics.get("eval/episodes_failed", metrics.get("eval/episodes/failed"))
        if n is None or failed is None or n <= 0 or failed < n:
            return None
        return f"no evaluation episode completed: all {n:.0f} failed{_causes(self.errors())}"
