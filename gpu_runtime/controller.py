"""The single controller: one driver process owns the loop; workers do the heavy lifting.

    for step: rollout (episodes) -> frozen log-probs (old / ref / values) -> advantages -> updates
              -> push weights to the rollout engine -> metrics -> checkpoint

Workers are in-process objects (`LocalGroup`, world size 1: fast tests and small jobs) or Ray actors placed
with a placement group (`RayGroup`); the loop is the same code for both.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from gpu_runtime import checkpoint
from gpu_runtime.algorithms import (
    LossNorm,
    gae_advantages,
    grpo_advantages,
    kl_estimate,
    reinforce_pp_advantages,
    rloo_advantages,
)
from gpu_runtime.batch import Sample
from gpu_runtime.data import SFTDataset
from gpu_runtime.envs import REMOTE_SECRET_VAR, egress_env
from gpu_runtime.failure_policy import FailureWatch
from gpu_runtime.models import load_tokenizer
from gpu_runtime.rollout.dynamic_sampling import collect_informative
from gpu_runtime.sink import Sink
from gpu_runtime.workers import RankWorker, RolloutWorker
from opentinker.spec import JobSpec

EXIT_OK, EXIT_FAILED, EXIT_CANCELLED, EXIT_TIME_LIMIT = 0, 1, 3, 4
SFT_MAX_LEN = 4096  # tokens per SFT conversation (longer ones are cut; not in the spec yet)


def derive_seed(*parts: int) -> int:
    """A stable 31-bit seed from integers (Python's hash() of ints is stable too, but explicit is clearer)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little") & 0x7FFFFFFF


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


class LocalGroup:
    """World size 1, in this process: no Ray, no process group."""

    def __init__(self, spec: JobSpec) -> None:
        js = spec.model_dump_json()
        self.ranks = [RankWorker(js)]
        # SFT without an environment has nothing to roll out.
        self.rollout = RolloutWorker(js) if spec.environment is not None else None
        self.world_size = 1

    def call(self, method: str, per_rank: list[tuple]) -> list[Any]:
        return [getattr(w, method)(*args) for w, args in zip(self.ranks, per_rank, strict=True)]

    def rollout_call(self, method: str, *args: Any) -> Any:
        return getattr(self.rollout, method)(*args)

    def shutdown(self) -> None:
        pass


class RayGroup:
    """Trainer ranks and one rollout worker as Ray actors in one placement group (PACK: one node when it
    fits). On a CPU-only node the bundles share the node's CPUs fractionally."""

    def __init__(self, spec: JobSpec, world_size: int, *, rollout: bool = True) -> None:
        # rollout=False: trainer ranks only (a multi-agent job's policies share one rollout worker).
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.ray = ray
        self.world_size = world_size
        gpus = spec.resources.gpus
        n_actors = world_size + int(rollout)
        # The rollout worker gets a GPU of its own when the job has one to spare; otherwise it shares rank
        # 0's bundle (half each), so a one-GPU job fits on one GPU.
        colocate = rollout and 0 < gpus <= world_size
        if gpus > 0:
            bundles = [{"CPU": 1, "GPU": 1} for _ in range(n_actors - int(colocate))]
            bundles[0]["CPU"] += int(colocate)
        else:
            cpu = min(1.0, ray.cluster_resources().get("CPU", 1) / n_actors)
            bundles = [{"CPU": cpu} for _ in range(n_actors)]
        self.pg = placement_group(bundles, strategy="PACK")
        ray.get(self.pg.ready(), timeout=120)

        def opts(i: int, share: float = 1.0) -> dict[str, Any]:
            b = bundles[i]
            return dict(
                num_cpus=b["CPU"] * share,
                num_gpus=b.get("GPU", 0) * share,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
            )

        js = spec.model_dump_json()
        master = f"127.0.0.1:{free_port()}"  # single-node; a multi-node pool would use rank 0's node IP
        rank_cls = ray.remote(RankWorker)
        self.ranks = [
            rank_cls.options(**opts(r, 0.5 if colocate and r == 0 else 1.0)).remote(js, r, world_size, master)
            for r in range(world_size)
        ]
        self.rollout = (
            ray.remote(RolloutWorker)
            .options(**(opts(0, 0.5) if colocate else opts(world_size)))
            # An argument, not the actor's runtime_env (readable through the cluster's API like the job's).
            .remote(js, os.environ.get(REMOTE_SECRET_VAR), egress_env())
            if spec.environment is not None and rollout
            else None
        )

    def call(self, method: str, per_rank: list[tuple]) -> list[Any]:
        refs = [getattr(a, method).remote(*args) for a, args in zip(self.ranks, per_rank, strict=True)]
        return self.ray.get(refs)

    def rollout_call(self, method: str, *args: Any) -> Any:
        return self.ray.get(getattr(self.rollout, method).remote(*args))

    def shutdown(self) -> None:
        from ray.util.placement_group import remove_placement_group

        try:
            self.call("shutdown", [() for _ in self.ranks])
        finally:
            for a in [*self.ranks, self.rollout]:
                if a is not None:
                    self.ray.kill(a)
            remove_placement_group(self.pg)


@dataclass
class RunResult:
    exit_code: int
    status: str
    step: int
    history: list[dict[str, float]]


class Controller:
    def __init__(
        self, spec: JobSpec, sink: Sink, group: LocalGroup | RayGroup, ckpt_prefix: str | None
    ) -> None:
        self.spec = spec
        self.sink = sink
        self.group = group
        self.ckpt_prefix = ckpt_prefix
        a = spec.algorithm
        self.algo = a.name
        self.norm_by_std = a.norm_adv_by_std and a.name != "dr_grpo"
        # Dr.GRPO: no std normalization and a constant-length token-sum normalization (no length bias).
        self.loss_agg = "seq-mean-token-sum-norm" if a.name == "dr_grpo" else a.loss_agg
        self.kl_in_reward = a.kl_coef > 0 and a.kl_placement == "reward"
        self.dynamic_sampling = a.dynamic_sampling or a.name == "dapo"
        self.sft_data: SFTDataset | None = None
        if spec.kind.value == "sft":
            assert spec.dataset is not None
            self.sft_data = SFTDataset.from_uri(
                spec.dataset.uri, load_tokenizer(spec.model.base), seed=spec.seed, max_len=SFT_MAX_LEN
            )

    # ---- helpers -----------------------------------------------------------------------------------------
    def _shards(self, samples: list[Sample]) -> tuple[list[list[Sample]], int]:
        ws = self.group.world_size
        shards = [samples[r::ws] for r in range(ws)]
        n_micro = max(1, math.ceil(max(len(s) for s in shards) / self.spec.algorithm.micro_batch_size))
        return shards, n_micro

    def _sync_weights(self) -> None:
        if self.group.rollout is None:
            return
        sd = self.group.call("full_state_dict", [() for _ in range(self.group.world_size)])[0]
        self.group.rollout_call("load_weights", sd)

    def _advantages(self, samples: list[Sample]) -> None:
        a = self.spec.algorithm
        for s in samples:  # KL in the reward: per-token penalty, the loss then has no KL term
            s.token_rewards = list(s.token_rewards)
            if self.kl_in_reward:
                kl = kl_estimate(torch.tensor(s.old_logprobs), torch.tensor(s.ref_logprobs), a.kl_estimator)
                for t, m in enumerate(s.mask):
                    if m:
                        s.token_rewards[t] -= a.kl_coef * float(kl[t])
        if self.algo in ("grpo", "dr_grpo", "dapo", "rloo"):
            rewards = torch.tensor([sum(s.token_rewards) for s in samples], dtype=torch.float64)
            groups = torch.tensor([s.group_id for s in samples])
            roles = [s.role for s in samples]  # per-role baselines in self-play (checklist item 7)
            if self.algo == "rloo":
                adv = rloo_advantages(rewards, groups, roles=roles)
            else:
                adv = grpo_advantages(rewards, groups, norm_by_std=self.norm_by_std, roles=roles)
            for s, v in zip(samples, adv.tolist(), strict=True):
                s.advantages = [v * m for m in s.mask]
            return
        T = max(len(s.token_ids) for s in samples)
        pad = lambda rows: torch.tensor([r + [0.0] * (T - len(r)) for r in rows], dtype=torch.float64)  # noqa: E731
        rewards = pad([s.token_rewards for s in samples])
        mask = pad([[float(m) for m in s.mask] for s in samples])
        if self.algo == "reinforce_pp":
            adv = reinforce_pp_advantages(rewards, mask, gamma=a.gae_gamma)
            returns = adv
        elif self.algo == "ppo":
            values = pad([s.values for s in samples])
            adv, returns = gae_advantages(rewards, values, mask, gamma=a.gae_gamma, lam=a.gae_lambda)
            # PPO whitens advantages over the batch's generated tokens.
            sel = adv[mask > 0]
            if sel.numel() > 1:
                adv = torch.where(mask > 0, (adv - sel.mean()) / (sel.std() + 1e-8), adv)
        else:
            raise ValueError(f"unknown algorithm {self.algo!r}")
        for i, s in enumerate(samples):
            n = len(s.token_ids)
            s.advantages = adv[i, :n].tolist()
            s.returns = returns[i, :n].tolist()

    def _collect_round(self, step: int, r: int) -> tuple[list[Sample], dict[str, float]]:
        """Round `r` of a step: `batch_size` prompts x `group_size` samples (a group = one prompt). Round 0 is
        the step's batch; later rounds only run to refill it under dynamic sampling (fresh prompts)."""
        a = self.spec.algorithm
        group_ids = [derive_seed(self.spec.seed, step, r * a.batch_size + g) for g in range(a.batch_size)]
        seeds = [g for g in group_ids for _ in range(a.group_size)]
        torch_seed = derive_seed(self.spec.seed, step, -1, *([r] if r else []))
        return self.group.rollout_call("collect", seeds, seeds, torch_seed)

    # ---- the loop ----------------------------------------------------------------------------------------
    def resume(self, uri: str) -> int:
        ck = checkpoint.load(uri)
        ws = self.group.world_size
        self.group.call("load", [(ck.weights, ck.state, ck.adapter) for _ in range(ws)])
        self.sink.log(f"resumed from {uri} at step {ck.step}")
        return ck.step

    def save(self, step: int) -> None:
        if self.ckpt_prefix is None:
            return
        payload = self.group.call("checkpoint_payload", [() for _ in range(self.group.world_size)])[0]
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

    def rl_step(self, step: int) -> dict[str, float]:
        a = self.spec.algorithm
        t0 = time.perf_counter()
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
        t1 = time.perf_counter()
        metrics = self._reward_metrics(generated)
        metrics.update(extra)
        n_gen = sum(s.n_generated for s in generated)
        if refill is not None:
            metrics.update(refill.metrics())
        samples = [s for s in samples if s.n_generated > 0]
        if not samples:
            self.sink.log(f"step {step}: no trainable samples, update skipped")
            return {**metrics, "time/rollout": t1 - t0}

        # The step's updates, planned first: the very first mini-batch of a one-epoch step is still on-policy,
        # so its old log-probs ARE the ones its own forward computes (ratio exactly 1) and the frozen pass
        # skips them: a quarter of that pass with two mini-batches and the reference model.
        rng = random.Random(derive_seed(self.spec.seed, step, -2))  # noqa: S311 (shuffling)
        updates = [minibatch_parts(samples, a.minibatches, rng) for _ in range(a.epochs)]
        on_policy = {id(s) for s in updates[0][0]} if a.epochs == 1 and not self.kl_in_reward else set()
        need_ref, values = a.kl_coef > 0, self.algo == "ppo"
        for need_old in (True, False):
            batch = [s for s in samples if (id(s) in on_policy) != need_old]
            if not batch or not (need_old or need_ref or values):
                continue
            shards, n_micro = self._shards(batch)
            outs = self.group.call("logprobs", [(sh, n_micro, need_old, need_ref, values) for sh in shards])
            for sh, out in zip(shards, outs, strict=True):
                for s, o in zip(sh, out, strict=True):
                    s.old_logprobs, s.ref_logprobs = o["old_logprobs"], o["ref_logprobs"]
                    s.values = o["values"]
        t2 = time.perf_counter()
        self._advantages(samples)
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
                norm = LossNorm(
                    tokens=sum(s.n_generated for s in part),
                    seqs=sum(1 for s in part if s.n_generated),
                    norm_len=a.max_new_tokens,
                    world_size=self.group.world_size,
                )
                shards, n_micro = self._shards(part)
                for out in self.group.call("train_minibatch", [(sh, norm, n_micro) for sh in shards]):
                    merge_sums(sums, out)
                if self.algo == "ppo":
                    for out in self.group.call("train_critic", [(sh, norm, n_micro) for sh in shards]):
                        merge_sums(sums, out)
        t3 = time.perf_counter()
        self._sync_weights()
        t4 = time.perf_counter()
        n_updates = a.epochs * a.minibatches * self.group.world_size
        tok = max(sums.get("tokens", 0.0), 1.0)
        metrics.update(
            {
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
                "time/rollout": t1 - t0,
                "time/logprob": t2 - t1,
                "time/update": t3 - t2,
                "time/sync": t4 - t3,
                "time/step": t4 - t0,
                "tokens_per_s": n_gen / (t4 - t0),
                "rollout/tokens_per_s": n_gen / max(t1 - t0, 1e-9),
            }
        )
        if "value_loss" in sums:
            metrics["value_loss"] = sums["value_loss"] / (a.epochs * a.minibatches)
        return metrics

    def sft_step(self, step: int) -> dict[str, float]:
        """One optimizer step of supervised fine-tuning: negative log-likelihood of the assistant tokens,
        token-mean over the whole batch (all micro-batches and ranks, checklist item 1)."""
        assert self.sft_data is not None
        a = self.spec.algorithm
        t0 = time.perf_counter()
        samples = self.sft_data.batch(step, a.batch_size)
        norm = LossNorm(
            tokens=sum(s.n_generated for s in samples),
            seqs=len(samples),
            norm_len=a.max_new_tokens,
            world_size=self.group.world_size,
        )
        shards, n_micro = self._shards(samples)
        sums: dict[str, float] = {}
        for out in self.group.call("train_minibatch", [(sh, norm, n_micro) for sh in shards]):
            merge_sums(sums, out)
        dt = time.perf_counter() - t0
        n_tok = sum(len(s.token_ids) for s in samples)
        return {
            "loss": sums["loss"],
            "grad_norm": sums["grad_norm"] / self.group.world_size,
            "lr": sums["lr"] / self.group.world_size,
            "entropy": sums["entropy"] / max(sums["tokens"], 1.0),
            "tokens/trained": sums["tokens"],
            "time/update": dt,
            "time/step": dt,
            "tokens_per_s": n_tok / max(dt, 1e-9),
        }

    @staticmethod
    def _reward_metrics(samples: list[Sample]) -> dict[str, float]:
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

    def evaluate(self, n: int, *, step: int = 0) -> dict[str, float]:
        """Greedy episodes on held-out seeds (a seed stream disjoint from training's derivation)."""
        seeds = [derive_seed(self.spec.seed, -7, i) for i in range(n)]
        samples, stats = self.group.rollout_call("collect", seeds, list(range(n)), 0, True)
        rewards = [s.reward for s in samples]
        return {
            "eval/reward_mean": sum(rewards) / max(len(rewards), 1),
            "eval/accuracy": sum(r > 0 for r in rewards) / max(n, 1),  # a failed episode is not correct
            "eval/episodes": float(n),
            "eval/episodes_failed": float(stats.get("episodes/failed", 0.0)),
        }

    def _episode_errors(self) -> list[str]:
        try:
            return list(self.group.rollout_call("episode_errors"))
        except Exception:  # a rollout worker that does not keep them (multi-agent)
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
        self._sync_weights()  # the rollout engine starts from the trainer's weights (initial or resumed)
        self.sink.event("started", step=start_step - 1, algorithm=a.name)
        watch = FailureWatch(spec, self._episode_errors)
        if spec.kind.value == "eval":
            m = self.evaluate(a.batch_size * a.group_size)
            self.sink.metrics(0, m)
            if reason := watch.after_eval(m):
                return self._failed(0, reason, [m])
            self.sink.event("finished", status="succeeded", step=0)
            return RunResult(EXIT_OK, "succeeded", 0, [m])
        history = []
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
            m = self.sft_step(step) if self.sft_data is not None else self.rl_step(step)
            history.append(m)
            self.sink.metrics(step, m)
            if self.sft_data is None and (reason := watch.after_step(step, m)):
                return self._failed(step, reason, history)
            if step % spec.checkpoint.every_steps == 0 and step != a.steps:
                self.save(step)
        if spec.checkpoint.save_final and step >= start_step:
            self.save(step)
        self.sink.event("finished", status="succeeded", step=step)
        return RunResult(EXIT_OK, "succeeded", step, history)
