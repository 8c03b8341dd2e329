"""The single controller: one driver process owns the loop; workers do the heavy lifting.

    for step: rollout (episodes) -> frozen log-probs (old / ref / values) -> advantages -> updates
              -> push weights to the rollout engine -> metrics -> checkpoint

Each arrow is a named phase of `Controller.rl_step`, timed as `time/<phase>` (`gpu_runtime.phases`); what
differs between algorithms is read from their registry entry (`gpu_runtime.algorithms.registry`).
Workers are reached through a `WorkerGroup` (`gpu_runtime.groups`): in-process objects (`LocalGroup`, world
size 1: fast tests and small jobs) or Ray actors placed with a placement group (`RayGroup`); the loop is the
same code for both. `JobLoop` is the part shared with the multi-agent controller: start, steps, cancellation,
time limit, failure policy, checkpoints.
"""

from __future__ import annotations

import hashlib
import math
import random
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from gpu_runtime import async_state, checkpoint
from gpu_runtime.algorithms import LossNorm, kl_estimate
from gpu_runtime.algorithms.registry import algorithm
from gpu_runtime.async_rollout import RolloutPipeline, dropout_sources
from gpu_runtime.batch import Sample
from gpu_runtime.data import SFTDataset
from gpu_runtime.data.prompts import PromptOrder, load_prompt_rows
from gpu_runtime.failure_policy import FailureWatch
from gpu_runtime.groups import LocalGroup as LocalGroup  # re-exported: benches and tests import them here
from gpu_runtime.groups import RayGroup as RayGroup
from gpu_runtime.groups import Rollout, WorkerGroup
from gpu_runtime.groups import free_port as free_port
from gpu_runtime.models import load_tokenizer
from gpu_runtime.phases import PhaseTimer
from gpu_runtime.rollout.dynamic_sampling import Refill, collect_informative
from gpu_runtime.rollout_log import Decoder, step_records
from gpu_runtime.sink import Sink
from gpu_runtime.workers import job_device
from opentinker.spec import JobSpec

EXIT_OK, EXIT_FAILED, EXIT_CANCELLED, EXIT_TIME_LIMIT = 0, 1, 3, 4
SFT_MAX_LEN = 4096  # tokens per SFT conversation (longer ones are cut; not in the spec yet)


def derive_seed(*parts: int) -> int:
    """A stable 31-bit seed from integers (Python's hash() of ints is stable too, but explicit is clearer)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little") & 0x7FFFFFFF


def merge_sums(sums: dict[str, float], out: dict[str, float]) -> None:
    """Add one rank's (or one mini-batch's) training sums into `sums`; `*_max` / `*_min` keys are extremes."""
    for k, v in out.items():
        if k.endswith("_max"):
            sums[k] = max(sums.get(k, -math.inf), v)
        elif k.endswith("_min"):
            sums[k] = min(sums.get(k, math.inf), v)
        else:
            sums[k] = sums.get(k, 0.0) + v


def minibatch_parts(samples: list[Sample], minibatches: int, rng: random.Random) -> list[list[Sample]]:
    """The step's samples in `minibatches` parts of whole groups, the groups in a shuffled order.

    Whole groups: each part then runs every prompt it holds once (`shared_prefix`; the prompt is most of each
    sequence), instead of every prompt in every part when samples are dealt out one by one."""
    groups: dict[int, list[Sample]] = {}
    for s in samples:
        groups.setdefault(s.group_id, []).append(s)
    order = list(groups.values())
    rng.shuffle(order)
    parts: list[list[Sample]] = [[] for _ in range(minibatches)]
    for i, g in enumerate(order):
        parts[i % minibatches].extend(g)
    return parts


def reward_metrics(samples: list[Sample]) -> dict[str, float]:
    """Rewards and lengths of a step's generated samples (all of them, trained on or not)."""
    if not samples:
        return {"reward/mean": 0.0, "reward/std": 0.0, "reward/max": 0.0, "response_length/mean": 0.0}
    r = torch.tensor([s.reward for s in samples], dtype=torch.float64)
    out = {
        "reward/mean": float(r.mean()),
        "reward/std": float(r.std()) if len(samples) > 1 else 0.0,
        "reward/max": float(r.max()),
        "response_length/mean": sum(s.n_generated for s in samples) / len(samples),
        "response_length/max": float(max(s.n_generated for s in samples)),
        "response/truncated_frac": sum(s.truncated for s in samples) / len(samples),
    }
    # Groups whose samples all got the same reward carry no GRPO/RLOO signal (advantages exactly 0).
    groups: dict[tuple[int, str], set[float]] = {}
    for s in samples:
        groups.setdefault((s.group_id, s.role), set()).add(s.reward)
    out["groups/zero_std_frac"] = sum(len(v) == 1 for v in groups.values()) / len(groups)
    roles = sorted({s.role for s in samples})
    if len(roles) > 1:
        for role in roles:
            out[f"reward/{role}/mean"] = float(
                torch.tensor([s.reward for s in samples if s.role == role]).mean()
            )
    return out


RolloutOut = tuple[list[Sample], list[Sample], dict[str, float]]  # generated, to train on, metrics
Produced = tuple[RolloutOut, list[str]]  # an async batch: the rollout and its episodes' errors
ASYNC_STATE = "async_rollouts"  # the checkpoint's trainer-state key for batches rolled out ahead


@dataclass
class RunResult:
    exit_code: int
    status: str
    step: int
    history: list[dict[str, float]]


class JobLoop(ABC):
    """A job from start to end, whatever it trains: steps until done, cancelled or out of time, the failure
    policy after each, periodic and final checkpoints. Subclasses say what a step, a checkpoint, a resume
    and an evaluation are."""

    def __init__(self, spec: JobSpec, sink: Sink, ckpt_prefix: str | None) -> None:
        self.spec = spec
        self.sink = sink
        self.ckpt_prefix = ckpt_prefix
        self._decoders: dict[str, Decoder] = {}
        self.records_rollouts = True  # off for the per-policy controllers of a multi-agent job

    def record_rollouts(
        self, step: int, samples: list[Sample], base_of: dict[str, str] | None = None
    ) -> None:
        """A few of the step's episodes, as text, to the sink (spec `rollouts`; gpu_runtime.rollout_log).
        `base_of`: the model each role's tokens come from, when roles are played by different models."""
        r = self.spec.rollouts
        if r.per_step == 0 or self.spec.kind.value != "rl" or not self.records_rollouts:
            return

        def decoder(s: Sample) -> Decoder:
            base = (base_of or {}).get(s.role, self.spec.model.base)
            if base not in self._decoders:  # loaded once, on the first step that records
                tok = load_tokenizer(base)
                self._decoders[base] = lambda ids: tok.decode(ids, skip_special_tokens=False)
            return self._decoders[base]

        episodes = step_records(samples, r.per_step, decoder, r.max_text_chars)
        if episodes:
            self.sink.rollouts(step, episodes)

    @abstractmethod
    def train_step(self, step: int) -> dict[str, float]: ...

    @abstractmethod
    def sync_weights(self) -> None:
        """The rollout engine(s) get the trainer's current weights."""

    @abstractmethod
    def save(self, step: int) -> None: ...

    @abstractmethod
    def resume(self, uri: str) -> int:
        """Load the checkpoint at `uri`; the step it was taken after."""

    @abstractmethod
    def evaluate(self, n: int, *, step: int = 0) -> dict[str, float]: ...

    def episode_errors(self) -> list[str]:
        """Why the last collection's failed episodes failed (a few reasons), for the failure policy."""
        return []

    def _failed(self, step: int, reason: str, history: list[dict[str, float]]) -> RunResult:
        """The failure policy stopped the job (gpu_runtime.failure_policy): failed, saying why."""
        self.sink.event("failed", error=reason, step=step)
        print(f"job failed: {reason}", file=sys.stderr, flush=True)  # the runner keeps it as the reason
        return RunResult(EXIT_FAILED, "failed", step, history)

    def run(self, *, resume: str | None = None, start_time: float | None = None) -> RunResult:
        spec = self.spec
        a = spec.algorithm
        started = start_time or time.monotonic()
        deadline = started + spec.resources.max_hours * 3600
        start_step = self.resume(resume) + 1 if resume else 1
        self.sync_weights()  # the rollout engine starts from the trainer's weights (initial or resumed)
        self.sink.event("started", step=start_step - 1, algorithm=a.name)
        watch = FailureWatch(spec, self.episode_errors)
        if spec.kind.value == "eval":
            m = self.evaluate(a.batch_size * a.group_size)
            self.sink.metrics(0, m)
            if reason := watch.after_eval(m):
                return self._failed(0, reason, [m])
            self.sink.event("finished", status="succeeded", step=0)
            return RunResult(EXIT_OK, "succeeded", 0, [m])
        history: list[dict[str, float]] = []
        step = start_step - 1
        for step in range(start_step, a.steps + 1):
            self.sink.heartbeat()
            if self.sink.should_cancel():
                self.sink.event("cancelled", step=step - 1)
                return RunResult(EXIT_CANCELLED, "cancelled", step - 1, history)
            if time.monotonic() > deadline:
                self.save(step - 1)
                self.sink.event("time_limit", step=step - 1, max_hours=spec.resources.max_hours)
                return RunResult(EXIT_TIME_LIMIT, "time_limit", step - 1, history)
            m = self.train_step(step)
            ds = spec.dataset
            if spec.kind.value == "rl" and ds is not None and ds.eval_rows:  # the dataset's held-out rows
                every = ds.eval_every or a.steps
                if step == a.steps or step % every == 0:
                    m = {**m, **self.evaluate(ds.eval_rows, step=step)}
            history.append(m)
            self.sink.metrics(step, m)
            if spec.kind.value == "rl" and (reason := watch.after_step(step, m)):
                return self._failed(step, reason, history)
            if step % spec.checkpoint.every_steps == 0 and step != a.steps:
                self.save(step)
        if spec.checkpoint.save_final and step >= start_step:
            self.save(step)
        self.sink.event("finished", status="succeeded", step=step)
        return RunResult(EXIT_OK, "succeeded", step, history)


class Controller(JobLoop):
    """A single-agent job (RL, SFT or eval) on one worker group."""

    def __init__(self, spec: JobSpec, sink: Sink, group: WorkerGroup, ckpt_prefix: str | None) -> None:
        super().__init__(spec, sink, ckpt_prefix)
        self.group = group
        a = spec.algorithm
        self.algorithm = algorithm(a.name)
        self.kl_in_reward = a.kl_coef > 0 and a.kl_placement == "reward"
        self.dynamic_sampling = a.dynamic_sampling or self.algorithm.dynamic_sampling
        self.pipeline: RolloutPipeline[Produced] | None = None  # async_rollout: made on first use
        self._batch_errors: list[str] = []  # async_rollout: why the trained batch's failed episodes failed
        self.sft_data: SFTDataset | None = None
        self.prompts: PromptOrder | None = None  # rl/eval on a dataset: which row each group plays
        if spec.dataset is not None and spec.kind.value != "sft":
            n = len(load_prompt_rows(spec.dataset))
            held_out = spec.dataset.eval_rows
            self.prompts = PromptOrder(train=n - held_out, held_out=held_out, seed=spec.seed)
        if spec.kind.value == "sft":
            assert spec.dataset is not None
            self.sft_data = SFTDataset.from_uri(
                spec.dataset.uri,
                load_tokenizer(spec.model.base),
                seed=spec.seed,
                max_len=SFT_MAX_LEN,
                columns=spec.dataset.columns,
            )

    # ---- helpers -----------------------------------------------------------------------------------------
    def _rollout_worker(self) -> Rollout:
        assert self.group.rollout is not None, "this job has no environment to roll out"
        return self.group.rollout

    def _shards(self, samples: list[Sample]) -> tuple[list[list[Sample]], int]:
        ws = self.group.world_size
        shards = [samples[r::ws] for r in range(ws)]
        n_micro = max(1, math.ceil(max(len(s) for s in shards) / self.spec.algorithm.micro_batch_size))
        return shards, n_micro

    def _norm(self, part: list[Sample]) -> LossNorm:
        return LossNorm(
            tokens=sum(s.n_generated for s in part),
            seqs=sum(1 for s in part if s.n_generated),
            norm_len=self.spec.algorithm.max_new_tokens,
            world_size=self.group.world_size,
        )

    def sync_weights(self, weights: dict[str, torch.Tensor] | None = None) -> None:
        """`weights`: a copy taken earlier instead of the trainer's current ones (async rollout)."""
        if self.group.rollout is None:
            return
        self.group.rollout.load_weights(weights if weights is not None else self.group.rollout_state_dict())

    def _async(self) -> RolloutPipeline[Produced] | None:
        """The rollout pipeline of an async job (spec `algorithm.async_rollout`; gpu_runtime.async_rollout),
        made on first use; None for a synchronous job."""
        ar = self.spec.algorithm.async_rollout
        if ar is None or self.pipeline is not None:
            return self.pipeline
        lora = self.spec.model.lora
        if isinstance(self.group, LocalGroup) and lora is not None and lora.dropout > 0:
            raise ValueError(
                "async_rollout with LoRA dropout needs the rollout worker in its own process (Ray): in one "
                "process the dropout would draw from the RNG that the rollout thread reseeds each step"
            )
        if isinstance(self.group, LocalGroup):
            drops = dropout_sources(self.group.ranks[0].trainer.model)
            if drops:
                raise ValueError(
                    f"async_rollout with a model that has dropout ({', '.join(drops[:3])}"
                    f"{f' and {len(drops) - 3} more' if len(drops) > 3 else ''}) needs the rollout worker in "
                    "its own process (--ray): in one process the dropout would draw from the RNG that the "
                    "rollout thread reseeds and samples from, so the run would depend on timing and not "
                    "resume exactly; or use a copy of the model with its dropout set to 0"
                )
        if isinstance(self.group, LocalGroup) and job_device(self.spec) == "cuda":
            raise ValueError(
                "async_rollout on a GPU needs the rollout worker in its own process (--ray): in one "
                "process both threads would queue on one CUDA stream (no overlap) while the decode loop "
                "captures its CUDA graphs"
            )
        worker = self._rollout_worker()
        self.pipeline = RolloutPipeline(
            produce=lambda step: (self._rollout(step), worker.episode_errors()),
            snapshot=self.group.rollout_state_dict,
            push=self.sync_weights,
            max_staleness=ar.max_staleness,
            last_step=self.spec.algorithm.steps,
        )
        return self.pipeline

    def run(self, *, resume: str | None = None, start_time: float | None = None) -> RunResult:
        try:
            return super().run(resume=resume, start_time=start_time)
        finally:
            if self.pipeline is not None:  # batches queued past a cancel or time limit are dropped
                self.pipeline.close()
                self.pipeline = None

    def _collect_round(self, step: int, r: int) -> tuple[list[Sample], dict[str, float]]:
        """Round `r` of a step: `batch_size` prompts x `group_size` samples (a group = one prompt). Round 0 is
        the step's batch; later rounds only run to refill it under dynamic sampling (fresh prompts)."""
        a = self.spec.algorithm
        group_ids = [derive_seed(self.spec.seed, step, r * a.batch_size + g) for g in range(a.batch_size)]
        seeds = [g for g in group_ids for _ in range(a.group_size)]
        torch_seed = derive_seed(self.spec.seed, step, -1, *([r] if r else []))
        if self.prompts is None:
            return self._rollout_worker().collect(seeds, seeds, torch_seed)
        # A dataset: the environment's seed is the row. Round 0 walks the epoch-shuffled stream; a refill
        # round (dynamic sampling) draws rows at random from the training split.
        rows = (
            self.prompts.step_rows(step, a.batch_size)
            if r == 0
            else [g % self.prompts.train for g in group_ids]
        )
        env_seeds = [row for row in rows for _ in range(a.group_size)]
        return self._rollout_worker().collect(env_seeds, seeds, torch_seed)

    # ---- checkpoints -------------------------------------------------------------------------------------
    def resume(self, uri: str) -> int:
        ck = checkpoint.load(uri)
        ahead = ck.state.pop(ASYNC_STATE, None)  # batches an async job had rolled out for later steps
        self.group.load(ck.weights, ck.state, ck.adapter)
        if ahead and (pipeline := self._async()) is not None:
            pipeline.restore(async_state.from_plain(ahead))
        self.sink.log(f"resumed from {uri} at step {ck.step}")
        return ck.step

    def save(self, step: int) -> None:
        if self.ckpt_prefix is None:
            return
        # An async job's batches for later steps are waited for and kept: the weights that sampled them are
        # gone after this step, so a resumed run trains on these rather than sampling them differently.
        ahead = self.pipeline.export() if self.pipeline is not None else {}
        payload = self.group.checkpoint_payload()
        if ahead:
            payload["state"] = {**payload["state"], ASYNC_STATE: async_state.to_plain(ahead)}
        uri, files = checkpoint.save(
            self.ckpt_prefix,
            step,
            weights=payload["weights"],
            adapter=payload["adapter"],
            state=payload["state"],
            meta={"spec": self.spec.model_dump(mode="json"), "data": {"next_step": step + 1}},
            config=payload["config"],
            tokenizer=payload["tokenizer"],
            peft_config=payload["peft_config"],
            keep_last=self.spec.checkpoint.keep_last,
        )
        self.sink.checkpoint(step, uri, files)

    # ---- the RL step, phase by phase ---------------------------------------------------------------------
    def train_step(self, step: int) -> dict[str, float]:
        return self.sft_step(step) if self.sft_data is not None else self.rl_step(step)

    def rl_step(self, step: int) -> dict[str, float]:
        timer = PhaseTimer()
        with timer.phase("rollout"):  # async: the wait for a batch rolled out during earlier updates
            generated, samples, metrics = self._take_rollout(step)
        with timer.phase("rollout_log"):
            self.record_rollouts(step, generated)
        n_gen = sum(s.n_generated for s in generated)
        samples = [s for s in samples if s.n_generated > 0]
        if not samples:
            self.sink.log(f"step {step}: no trainable samples, update skipped")
            return {**metrics, **timer.times}
        with timer.phase("logprob"):
            updates = self._plan_updates(step, samples)
            self._frozen_logprobs(samples, updates)
        with timer.phase("advantages"):
            self._advantages(samples)
        with timer.phase("update"):
            sums = self._update(samples, updates)
        with timer.phase("sync"):
            if self.pipeline is None:  # async: the pipeline pushes a copy before its next rollout
                self.sync_weights()
        metrics.update(self._update_metrics(sums))
        times = timer.metrics()
        metrics.update(times)
        metrics["tokens_per_s"] = n_gen / times["time/step"]
        # Async: time/rollout is the wait for the batch, rolled out in the background (async/rollout_s).
        rollout_s = metrics.get("async/rollout_s", times["time/rollout"])
        metrics["rollout/tokens_per_s"] = n_gen / max(rollout_s, 1e-9)
        if "value_loss" in sums:
            metrics["value_loss"] = sums["value_loss"] / (
                self.spec.algorithm.epochs * self.spec.algorithm.minibatches
            )
        return metrics

    def _take_rollout(self, step: int) -> RolloutOut:
        pipeline = self._async()
        if pipeline is None:
            return self._rollout(step)
        ((generated, samples, metrics), self._batch_errors), extra = pipeline.take(step)
        return generated, samples, {**metrics, **extra}

    def _rollout(self, step: int) -> RolloutOut:
        """The step's episodes: (every sample generated, the samples to train on, rollout metrics)."""
        a = self.spec.algorithm
        samples, extra = self._collect_round(step, 0)
        generated, refill = samples, None
        if self.dynamic_sampling:  # DAPO: train on informative groups only, generating more to refill
            extras = [extra]

            def more(r: int) -> list[Sample]:
                if r == 0:
                    return samples
                batch, e = self._collect_round(step, r)
                extras.append(e)
                return batch

            refill = collect_informative(more, target=a.batch_size, max_rounds=a.dynamic_sampling_max_rounds)
            generated, samples = refill.generated, refill.samples
            extra = {k: sum(e.get(k, 0.0) for e in extras) for k in extras[0]}
        return generated, samples, self._rollout_metrics(generated, extra, refill)

    @staticmethod
    def _rollout_metrics(
        generated: list[Sample], extra: dict[str, float], refill: Refill | None
    ) -> dict[str, float]:
        metrics = reward_metrics(generated)
        metrics.update(extra)
        if refill is not None:
            metrics.update(refill.metrics())
        return metrics

    def _plan_updates(self, step: int, samples: list[Sample]) -> list[list[list[Sample]]]:
        """The step's updates, planned before any runs: per epoch, its mini-batches (whole groups)."""
        a = self.spec.algorithm
        rng = random.Random(derive_seed(self.spec.seed, step, -2))  # noqa: S311 (shuffling)
        return [minibatch_parts(samples, a.minibatches, rng) for _ in range(a.epochs)]

    def _frozen_logprobs(self, samples: list[Sample], updates: list[list[list[Sample]]]) -> None:
        """Old log-probs, reference log-probs and critic values, all before the first update.

        The very first mini-batch of a one-epoch step is still on-policy, so its old log-probs ARE the ones
        its own forward computes (ratio exactly 1) and this pass skips them: a quarter of the pass with two
        mini-batches and the reference model."""
        a = self.spec.algorithm
        on_policy = {id(s) for s in updates[0][0]} if a.epochs == 1 and not self.kl_in_reward else set()
        need_ref, values = self.algorithm.reference(a), self.algorithm.critic
        for stale in (True, False):
            batch = [s for s in samples if (id(s) in on_policy) != stale]
            need_old = stale and self.algorithm.old_logprobs
            if not batch or not (need_old or need_ref or values):
                continue
            shards, n_micro = self._shards(batch)
            outs = self.group.logprobs(shards, n_micro, old=need_old, ref=need_ref, values=values)
            for sh, out in zip(shards, outs, strict=True):
                for s, o in zip(sh, out, strict=True):
                    s.old_logprobs, s.ref_logprobs = o["old_logprobs"], o["ref_logprobs"]
                    s.values = o["values"]

    def _advantages(self, samples: list[Sample]) -> None:
        a = self.spec.algorithm
        for s in samples:  # KL in the reward: per-token penalty, the loss then has no KL term
            s.token_rewards = list(s.token_rewards)
            if self.kl_in_reward:
                assert s.old_logprobs is not None and s.ref_logprobs is not None
                kl = kl_estimate(torch.tensor(s.old_logprobs), torch.tensor(s.ref_logprobs), a.kl_estimator)
                for t, m in enumerate(s.mask):
                    if m:
                        s.token_rewards[t] -= a.kl_coef * float(kl[t])
        estimator = self.algorithm.advantages
        assert estimator is not None, f"{a.name} has no advantage estimator"
        estimator(samples, a)

    def _update(self, samples: list[Sample], updates: list[list[list[Sample]]]) -> dict[str, float]:
        """Every planned mini-batch's optimizer step (and the critic's); the ranks' training sums."""
        a = self.spec.algorithm
        if a.epochs * a.minibatches == 1:
            # One epoch, one mini-batch: the update uses its own detached log-probs as old ones (ratio = 1
            # exactly); the frozen pass was only needed for the KL reward.
            for s in samples:
                s.old_logprobs = None
        sums: dict[str, float] = {}
        for parts in updates:
            for part in parts:
                if not part:
                    continue
                norm = self._norm(part)
                shards, n_micro = self._shards(part)
                for out in self.group.train_minibatch(shards, norm, n_micro):
                    merge_sums(sums, out)
                if self.algorithm.critic:
                    for out in self.group.train_critic(shards, norm, n_micro):
                        merge_sums(sums, out)
        return sums

    def _update_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        a = self.spec.algorithm
        n_updates = a.epochs * a.minibatches * self.group.world_size
        tok = max(sums.get("tokens", 0.0), 1.0)
        return {
            "kl": sums["kl"] / tok,
            "entropy": sums["entropy"] / tok,
            "clip_frac": sums["clip"] / tok,
            "ratio/mean": sums["ratio"] / tok,
            "ratio/max": sums["ratio_max"] if math.isfinite(sums["ratio_max"]) else 1.0,
            "ratio/min": sums["ratio_min"] if math.isfinite(sums["ratio_min"]) else 1.0,
            "is_weight/mean": sums["is_weight"] / tok,
            "logprob_gap": sums["gap"] / tok,
            "loss": sums["loss"] / (a.epochs * a.minibatches),
            "grad_norm": sums["grad_norm"] / n_updates,
            "lr": sums["lr"] / n_updates,
        }

    def sft_step(self, step: int) -> dict[str, float]:
        """One optimizer step of supervised fine-tuning: negative log-likelihood of the assistant tokens,
        token-mean over the whole batch (all micro-batches and ranks, checklist item 1)."""
        assert self.sft_data is not None
        a = self.spec.algorithm
        timer = PhaseTimer()
        with timer.phase("update"):
            samples = self.sft_data.batch(step, a.batch_size)
            norm = LossNorm(
                tokens=sum(s.n_generated for s in samples),
                seqs=len(samples),
                norm_len=a.max_new_tokens,
                world_size=self.group.world_size,
            )
            shards, n_micro = self._shards(samples)
            sums: dict[str, float] = {}
            for out in self.group.train_minibatch(shards, norm, n_micro):
                merge_sums(sums, out)
        times = timer.metrics()
        n_tok = sum(len(s.token_ids) for s in samples)
        return {
            "loss": sums["loss"],
            "grad_norm": sums["grad_norm"] / self.group.world_size,
            "lr": sums["lr"] / self.group.world_size,
            "entropy": sums["entropy"] / max(sums["tokens"], 1.0),
            "tokens/trained": sums["tokens"],
            **times,
            "tokens_per_s": n_tok / max(times["time/step"], 1e-9),
        }

    # ---- evaluation and the failure policy's inputs --------------------------------------------------------
    def evaluate(self, n: int, *, step: int = 0) -> dict[str, float]:
        """Greedy episodes on held-out seeds (a seed stream disjoint from training's derivation); on a
        dataset, one on each held-out row (each row when none is held out)."""
        seeds = [derive_seed(self.spec.seed, -7, i) for i in range(n)]
        if self.prompts is not None:
            seeds = self.prompts.eval_rows()
            n = len(seeds)
        samples, stats = self._rollout_worker().collect(seeds, list(range(n)), 0, True)
        rewards = [s.reward for s in samples]
        return {
            "eval/reward_mean": sum(rewards) / max(len(rewards), 1),
            "eval/accuracy": sum(r > 0 for r in rewards) / max(n, 1),  # a failed episode is not correct
            "eval/episodes": float(n),
            "eval/episodes_failed": float(stats.get("episodes/failed", 0.0)),
        }

    def episode_errors(self) -> list[str]:
        if self.pipeline is not None:
            return list(self._batch_errors)
        return [] if self.group.rollout is None else list(self.group.rollout.episode_errors())
