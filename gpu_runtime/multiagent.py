"""Multi-agent jobs: every role of a multi-agent environment played by a policy, every trained policy trained.

    for step: games through the coordinator (each role's moves sampled by its policy's rollout engine)
              -> per policy: its roles' episodes -> advantages (per-role baselines) -> its own update
              -> that policy's weights to its rollout engine -> metrics per role and per policy -> checkpoint

`spec.multi_agent` maps roles to policies: one trained policy for all roles is self-play; several trained
policies each keep their own parameter set, optimizer and trainer ranks; a `rule` policy is the environment's
rule-based player. Without `multi_agent`, a multi-agent environment is self-play with the job's model.

Each trained policy is driven by a plain `Controller` over a view of its own ranks, fed the samples its roles
produced in the step's games, so the policy update is exactly the single-agent code path. A rollout worker
holds every policy's engine and runs the games, batched across games (`gpu_runtime.rollout.games`); with
`resources.rollout_workers` N, N workers play the step's games in parts (`gpu_runtime.multiagent_pool`),
every policy's new weights go to each of them, and the statistics are pooled by game and move counts.
A checkpoint is one step directory with a subdirectory per policy (HF layout or PEFT adapter each).
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import torch

from gpu_runtime import checkpoint, storage
from gpu_runtime.batch import Sample
from gpu_runtime.controller import Controller, JobLoop, derive_seed, reward_metrics
from gpu_runtime.env_packages import PackageEnvFactory
from gpu_runtime.envs import env_factory
from gpu_runtime.game_stats import Tally, game_tally, policy_game_tally, versus_rule_metrics
from gpu_runtime.groups import LocalGroup, RayGroup, WorkerGroup, blocking
from gpu_runtime.models import load_model, torch_dtype
from gpu_runtime.multiagent_pool import MultiAgentRolloutPool
from gpu_runtime.phases import PhaseTimer
from gpu_runtime.rollout.base import SamplingParams
from gpu_runtime.rollout.collector import episode_to_sample
from gpu_runtime.rollout.games import WithStops, run_games
from gpu_runtime.sink import Sink
from gpu_runtime.workers import configure_threads, job_device, rollout_engine
from opentinker.env.codec import HFChatCodec
from opentinker.env.multiagent import MultiAgentEnvironment, MultiAgentEpisode, MultiAgentProtocol
from opentinker.env.protocol import Budget
from opentinker.spec import JobSpec, MultiAgentSpec, PolicySpec

# Per-policy copies of these training metrics go under `policy/<name>/`; the top-level value is their mean.
POLICY_METRICS = (
    "loss", "kl", "entropy", "clip_frac", "grad_norm", "lr", "logprob_gap", "ratio/mean", "is_weight/mean",
    "value_loss", "reward/mean", "response_length/mean", "batch/kept_samples", "ratio/max", "ratio/min",
    "groups/zero_std_frac", "response/truncated_frac",
)  # fmt: skip
# Each policy's controller times these phases of its own step; the job's value is their sum.
POLICY_PHASES = ("time/logprob", "time/advantages", "time/update", "time/sync")
SELF_PLAY = "main"  # the one policy's name when the spec leaves `multi_agent` out
T = TypeVar("T")


@dataclass(frozen=True)
class MultiAgentSetup:
    """A multi-agent spec checked against its environment."""

    mapping: MultiAgentSpec
    role_policy: dict[str, str | None]  # role -> trained policy name, None = rule-based player
    trained: list[str]
    specs: dict[str, JobSpec]  # per trained policy: the job's spec with that policy's model and optimizer


@dataclass(frozen=True)
class _Game:
    """What the multi-agent runtime needs to know of an environment before playing it."""

    multi_agent: bool
    name: str
    roles: tuple[str, ...]
    rule_player: bool


def _game(spec: JobSpec) -> _Game:
    """A built-in's class, or a registry package (its manifest's protocol; its roles and rule-based player
    from one sandboxed instance of its code, checked against the manifest)."""
    assert spec.environment is not None
    factory = env_factory(spec.environment)
    if isinstance(factory, PackageEnvFactory):
        if not factory.multi_agent:
            return _Game(False, factory.name, factory.roles, False)
        return _Game(True, factory.name, factory.roles, factory.rule_player)
    cls = getattr(factory, "func", factory)
    if not (isinstance(cls, type) and issubclass(cls, MultiAgentEnvironment)):
        return _Game(False, getattr(cls, "name", ""), (), False)
    rule = cls.rule_based_action is not MultiAgentEnvironment.rule_based_action
    return _Game(True, cls.name, tuple(cls.roles), rule)


def is_multi_agent(spec: JobSpec) -> bool:
    """Whether this job runs games: multi_agent settings, or an environment that declares several roles."""
    if spec.multi_agent is not None:
        return True
    if spec.environment is None:
        return False
    try:
        factory = env_factory(spec.environment)
    except (NotImplementedError, ValueError):  # not a built-in: the single-agent path reports it
        return False
    if isinstance(factory, PackageEnvFactory):
        return factory.multi_agent  # from the manifest: no package code runs to decide
    cls = getattr(factory, "func", factory)
    return isinstance(cls, type) and issubclass(cls, MultiAgentEnvironment)


def policy_spec(spec: JobSpec, policy: PolicySpec) -> JobSpec:
    """The job as one trained policy sees it: its model and optimizer settings, no multi-agent part."""
    overrides = {"learning_rate": policy.learning_rate, "max_grad_norm": policy.max_grad_norm}
    algorithm = spec.algorithm.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    return spec.model_copy(
        update={"model": policy.model or spec.model, "algorithm": algorithm, "multi_agent": None}
    )


def _default_mapping(spec: JobSpec, cls: _Game) -> MultiAgentSpec:
    """No `multi_agent`: self-play, or the built-ins' `opponent: rule` config (one role trained, the others
    played by the rule-based player) as `opentinker.env.builtin.make_builtin` reads it."""
    assert spec.environment is not None
    config = spec.environment.config
    if config.get("opponent", "policy") == "policy":
        return MultiAgentSpec(policies={SELF_PLAY: PolicySpec()}, roles=dict.fromkeys(cls.roles, SELF_PLAY))
    if config["opponent"] != "rule":
        raise ValueError("environment.config.opponent must be 'rule' or 'policy'")
    trained = config.get("role", cls.roles[0])
    if trained not in cls.roles:
        raise ValueError(f"environment.config.role: {cls.name} has no role {trained!r}")
    roles = {r: SELF_PLAY if r == trained else "rule" for r in cls.roles}
    return MultiAgentSpec(policies={SELF_PLAY: PolicySpec(), "rule": PolicySpec(kind="rule")}, roles=roles)


def resolve(spec: JobSpec) -> MultiAgentSetup:
    """Check `spec.multi_agent` against the environment; ValueError with every problem named."""
    assert spec.environment is not None
    if spec.multi_agent is not None and "opponent" in spec.environment.config:
        raise ValueError(
            "environment.config.opponent and multi_agent both say who plays: keep multi_agent only"
        )
    cls = _game(spec)
    name = cls.name or spec.environment.ref
    if not cls.multi_agent:
        raise ValueError(
            f"multi_agent: {spec.environment.ref} is a single-agent environment; "
            "multi_agent settings need one with several roles"
        )
    mapping = spec.multi_agent or _default_mapping(spec, cls)
    errors = mapping.role_errors(name, cls.roles, rule_player=cls.rule_player)
    if errors:
        raise ValueError("multi_agent.roles: " + "; ".join(errors))
    if mapping.eval_vs_rule is not None and not cls.rule_player:
        raise ValueError(f"multi_agent.eval_vs_rule: {name} has no rule-based player to evaluate against")
    if mapping.rule_mix and not cls.rule_player:
        raise ValueError(f"multi_agent.rule_mix: {name} has no rule-based player to play against")
    role_policy = {
        r: (p if mapping.policies[p].kind == "trained" else None) for r, p in mapping.roles.items()
    }
    trained = mapping.trained
    return MultiAgentSetup(
        mapping, role_policy, trained, {p: policy_spec(spec, mapping.policies[p]) for p in trained}
    )


def game_stats(games: list[MultiAgentEpisode], roles: list[str]) -> dict[str, float]:
    """Per-role statistics of finished games (`gpu_runtime.game_stats.game_tally`) as metrics."""
    return game_tally(games, roles).values()


def policy_game_stats(
    games: list[MultiAgentEpisode], seatings: list[dict[str, str | None]], policies: list[str]
) -> dict[str, float]:
    """Per trained policy, over the roles it played: `policy/<name>/win_rate` and `.../illegal_rate`."""
    return policy_game_tally(games, seatings, policies).values()


def _logged(errors: list[str]) -> list[str]:
    for reason in errors:  # a few distinct reasons (`game_stats.MAX_ERRORS`)
        print(f"game failed: {reason}", file=sys.stderr, flush=True)  # the job's log keeps why
    return errors


class MultiAgentRolloutWorker:
    """Every trained policy's rollout engine, the environment and the coordinator; runs a step's games."""

    def __init__(self, spec_json: str) -> None:
        spec = JobSpec.model_validate_json(spec_json)
        assert spec.environment is not None
        configure_threads(spec)
        self.spec = spec
        self.setup = resolve(spec)
        device = job_device(spec)
        self.engines: dict[str, WithStops] = {}
        codecs: dict[str, HFChatCodec] = {}
        for name in self.setup.trained:
            model = self.setup.specs[name].model  # bf16 sampling on GPU, as the single-agent rollout worker
            loaded = load_model(model.base, seed=spec.seed, dtype=torch_dtype(model.dtype, device=device))
            codecs[name] = HFChatCodec(loaded.tokenizer)
            engine = rollout_engine(
                loaded.model,
                pad_id=loaded.tokenizer.pad_token_id,
                device=device,
                choice=spec.rollout.engine,
            )
            self.engines[name] = WithStops(engine, codecs[name].stop_ids)
        self.policy_codecs = codecs
        # resolve() checked that the environment plays games (a multi-agent environment).
        self.make_env = cast(Callable[[], MultiAgentEnvironment], env_factory(spec.environment))
        rule_eval = self.setup.mapping.eval_vs_rule
        self.make_eval_env = self.make_env  # the games against the rule player: a training curriculum off
        if rule_eval is not None and rule_eval.environment_config:
            config = {**spec.environment.config, **rule_eval.environment_config}
            env = spec.environment.model_copy(update={"config": config})
            self.make_eval_env = cast(Callable[[], MultiAgentEnvironment], env_factory(env))
        a = spec.algorithm
        self.protocol = MultiAgentProtocol(
            Budget(max_turns=self.setup.mapping.max_rounds, max_new_tokens=a.max_new_tokens)
        )

    def _codecs(self, role_policy: dict[str, str | None]) -> dict[str, HFChatCodec]:
        # A rule-played role has no tokens; any codec serves its (unused) slot.
        fallback = next(iter(self.policy_codecs.values()))
        return {r: self.policy_codecs[p] if p else fallback for r, p in role_policy.items()}

    def seatings(self, group_ids: list[int], first_group: int = 0) -> list[dict[str, str | None]]:
        """Who plays each role in each game, per game group (a group id's order of first appearance): the
        job's mapping; with `rotate_roles` that mapping rotated by one from each policy-vs-policy group to
        the next, so each policy plays every role; with `rule_mix`, that share of the groups (evenly spread)
        seats one trained policy against the rule-based player in every other role, cycling through every
        (policy, role) pair. `first_group`: the step-wide index of the first group (a rollout worker's part
        of the step), so every part seats its groups as one worker seats the whole step."""
        ma = self.setup.mapping
        base = self.setup.role_policy
        roles, trained = list(base), self.setup.trained
        rotated = [
            {r: base[roles[(k + j) % len(roles)]] for k, r in enumerate(roles)} for j in range(len(roles))
        ]
        per_group: list[dict[str, str | None]] = []
        vs_policy = vs_rule = 0
        for j in range(first_group + len(dict.fromkeys(group_ids))):
            if int((j + 1) * ma.rule_mix) > int(j * ma.rule_mix):
                policy, seat = trained[vs_rule % len(trained)], roles[(vs_rule // len(trained)) % len(roles)]
                per_group.append({r: policy if r == seat else None for r in roles})
                vs_rule += 1
            else:
                per_group.append(rotated[vs_policy % len(roles)] if ma.rotate_roles else base)
                vs_policy += 1
        index = {g: first_group + i for i, g in enumerate(dict.fromkeys(group_ids))}
        return [per_group[index[g]] for g in group_ids]

    def collect(
        self, seeds: list[int], group_ids: list[int], torch_seed: int, greedy: bool = False
    ) -> tuple[dict[str, list[Sample]], dict[str, float]]:
        """Samples per trained policy (one per game and role it plays) and per-role game statistics."""
        per_policy, tally = self.collect_part(seeds, group_ids, torch_seed, greedy)
        return per_policy, tally.values()

    def collect_part(
        self,
        seeds: list[int],
        group_ids: list[int],
        torch_seed: int,
        greedy: bool = False,
        first: int = 0,
        first_group: int = 0,
    ) -> tuple[dict[str, list[Sample]], Tally]:
        """`collect` of a part of the step, its statistics as a tally (`gpu_runtime.game_stats`) for the
        pool to add up. `first`, `first_group`: the step-wide index of the part's first game and group: each
        request samples with a seed of (torch_seed, game index, request), games keep their step-wide index
        and groups their seating, so the tokens and seats do not depend on the split."""
        torch.manual_seed(torch_seed)  # sampling depends only on (job seed, step): resume is exact
        a = self.spec.algorithm
        sampling = SamplingParams(
            max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, greedy=greedy
        )
        seatings = self.seatings(group_ids, first_group)
        codecs = [self._codecs(m) for m in seatings]
        engines = self.engines
        games = run_games(self.make_env, self.protocol, codecs, engines, seatings, sampling, seeds, first)
        per_policy: dict[str, list[Sample]] = {p: [] for p in self.setup.trained}
        for i, (game, g, seating) in enumerate(zip(games, group_ids, seatings, strict=True)):
            if not game.failed:
                for role, ep in game.per_role.items():
                    policy = seating[role]
                    if policy is not None:
                        per_policy[policy].append(episode_to_sample(ep, g, game=first + i))
        tally = game_tally(games, list(self.setup.role_policy))
        if self.setup.mapping.rotate_roles or self.setup.mapping.rule_mix:  # roles no longer name policies
            tally.merge(policy_game_tally(games, seatings, self.setup.trained))
        return per_policy, tally

    def versus_rule(self, seeds: list[int]) -> dict[str, float]:
        """Greedy games of every trained policy in every role against the rule-based player (all other
        roles): `vs_rule/<policy>/<role>/...` statistics, and per policy their mean over its roles."""
        return versus_rule_metrics(self.versus_rule_part(seeds))

    def versus_rule_part(self, seeds: list[int], first: int = 0) -> dict[tuple[str, str], Tally]:
        """The rule-player evaluation's games on these seeds (a part of them: `first` is the index of the
        first), tallied per (policy, role) for the pool to add up."""
        a = self.spec.algorithm
        sampling = SamplingParams(max_new_tokens=a.max_new_tokens, greedy=True)
        roles = list(self.setup.role_policy)
        out: dict[tuple[str, str], Tally] = {}
        for policy in self.setup.trained:
            for role in roles:
                seating = {r: (policy if r == role else None) for r in roles}
                games = run_games(
                    self.make_eval_env,
                    self.protocol,
                    self._codecs(seating),
                    self.engines,
                    seating,
                    sampling,
                    seeds,
                    first,
                )
                out[policy, role] = game_tally(games, roles)
        return out

    def load_weights(self, policy: str, state_dict: dict[str, torch.Tensor]) -> None:
        self.engines[policy].load_weights(state_dict)


class MultiAgentGroup:
    """Trainer ranks per trained policy (in process, or Ray actors in a placement group per policy) and the
    rollout workers (`resources.rollout_workers`), each holding every policy's engine; several are one
    `MultiAgentRolloutPool`. In process everything shares the job's device (several workers play their
    parts in turn: parity tests); with Ray on GPUs each policy's ranks take `world_size` GPUs and each
    rollout worker one more."""

    def __init__(self, spec: JobSpec, *, use_ray: bool = False, world_size: int = 1) -> None:
        self.setup = resolve(spec)
        self.world_size = world_size
        self.ray: Any = None
        self.rollout_actors: list[Any] = []
        js = spec.model_dump_json()
        n = spec.resources.rollout_workers
        self.ranks: dict[str, WorkerGroup] = {}
        self.rollout: MultiAgentRolloutWorker | MultiAgentRolloutPool
        if use_ray:
            import ray

            self.ray = ray
            # On CPUs the policies' placement groups split the job's admitted CPUs: each reserving all of
            # them asked the shared cluster for (trained policies) x what the scheduler admitted.
            share = spec.resources.cpus / len(self.setup.trained)
            try:  # a policy's placement that fails (or times out) stops the policies already placed
                for p in self.setup.trained:
                    self.ranks[p] = RayGroup(self.setup.specs[p], world_size, rollout=False, cpus=share)
            except BaseException:
                self.shutdown()
                raise
            gpu = spec.resources.gpus > 0
            # CPU: the workers share the nodes' cores, like the ranks; `spread`: across nodes, best effort.
            options: dict[str, Any] = {"num_cpus": 0, "num_gpus": 1 if gpu else 0}
            if spec.resources.placement == "spread":
                options["scheduling_strategy"] = "SPREAD"
            actor_cls = ray.remote(MultiAgentRolloutWorker).options(**options)
            self.rollout_actors = [actor_cls.remote(js) for _ in range(n)]
            self.rollout = (
                blocking(ray, self.rollout_actors[0], MultiAgentRolloutWorker)
                if n == 1
                else MultiAgentRolloutPool(self.rollout_actors, ray)
            )
        else:
            if world_size != 1:
                raise ValueError("more than one trainer rank per policy needs Ray")
            self.ranks = {p: LocalGroup(self.setup.specs[p], rollout=False) for p in self.setup.trained}
            workers = [MultiAgentRolloutWorker(js) for _ in range(n)]
            self.rollout = workers[0] if n == 1 else MultiAgentRolloutPool(workers)

    def shutdown(self) -> None:
        """Every policy's ranks and every rollout actor, even when one of them fails to stop (a policy's rank
        lost unnoticed fails its group's goodbye): the first error is raised once all are stopped. A policy
        left running would hold its placement group in a shared cluster."""
        errors: list[BaseException] = []
        for g in self.ranks.values():
            try:
                g.shutdown()
            except Exception as e:
                errors.append(e)
        for actor in self.rollout_actors:
            try:
                self.ray.kill(actor)
            except Exception as e:
                errors.append(e)
        if errors:
            raise errors[0]


class _PolicyRollout:
    """One policy's rollout as its `Controller` sees it: `collect` hands over the samples its roles produced
    in this step's games, `load_weights` updates its engine in the shared rollout worker."""

    def __init__(self, group: MultiAgentGroup, name: str) -> None:
        self.group, self.name = group, name
        self.samples: list[Sample] = []

    def collect(
        self, seeds: list[int], group_ids: list[int], torch_seed: int, greedy: bool = False
    ) -> tuple[list[Sample], dict[str, float]]:
        # The step's games ran already; a further call (DAPO refill) gets nothing: a policy cannot play more
        # games alone, so dynamic sampling here drops flat groups without refilling the batch.
        samples, self.samples = self.samples, []
        return samples, {}

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.group.rollout.load_weights(self.name, state_dict)

    def episode_errors(self) -> list[str]:
        return []  # the multi-agent controller's failure policy reads the games


class _PolicyView(WorkerGroup):
    """What one policy's `Controller` sees as its group: its own ranks, and its `_PolicyRollout`."""

    def __init__(self, ranks: WorkerGroup, rollout: _PolicyRollout) -> None:
        self.ranks, self.rollout = ranks, rollout
        self.world_size = ranks.world_size

    def _on_ranks(self, method: Callable[..., T], per_rank: Sequence[tuple[Any, ...]]) -> list[T]:
        return self.ranks._on_ranks(method, per_rank)


class _PolicySink(Sink):
    """The job's sink as one policy's controller uses it: its log lines name the policy."""

    def __init__(self, sink: Sink, name: str) -> None:
        self.sink, self.name = sink, name

    def log(self, line: str) -> None:
        self.sink.log(f"policy {self.name}: {line}")

    def metrics(self, step: int, values: dict[str, float]) -> None:
        self.sink.metrics(step, values)

    def event(self, kind: str, **data: Any) -> None:
        self.sink.event(kind, **data)

    def checkpoint(self, step: int, uri: str, files: list[dict[str, Any]]) -> None:
        self.sink.checkpoint(step, uri, files)

    def rollouts(self, step: int, episodes: list[dict[str, Any]]) -> None:
        pass  # the multi-agent controller records whole games, every policy's roles together

    def heartbeat(self) -> None:
        self.sink.heartbeat()

    def should_cancel(self) -> bool:
        return self.sink.should_cancel()


class MultiAgentController(JobLoop):
    """The step's games, then each trained policy's update by a plain `Controller` on its own samples."""

    def __init__(self, spec: JobSpec, sink: Sink, group: MultiAgentGroup, ckpt_prefix: str | None) -> None:
        if spec.algorithm.async_rollout is not None:  # its per-policy controllers would each run ahead
            raise ValueError("algorithm.async_rollout is not supported for multi-agent jobs yet")
        super().__init__(spec, sink, ckpt_prefix)
        self.group = group
        self.setup = group.setup
        self.feeds = {p: _PolicyRollout(group, p) for p in self.setup.trained}
        self.views = {p: _PolicyView(group.ranks[p], self.feeds[p]) for p in self.setup.trained}
        self.policies = {
            p: Controller(self.setup.specs[p], _PolicySink(sink, p), self.views[p], None) for p in self.views
        }
        for ctl in self.policies.values():
            ctl.records_rollouts = False  # this controller records whole games (`_rl_step`)
        roles = self.setup.role_policy.items()
        self.base_of = {role: self.setup.specs[p].model.base for role, p in roles if p is not None}
        self._errors: list[str] = []  # why the last collection's failed games failed

    def _play(
        self, seeds: list[int], group_ids: list[int], torch_seed: int, greedy: bool = False
    ) -> tuple[dict[str, list[Sample]], dict[str, float]]:
        """The games, on the rollout worker or pool; why failed games failed is logged here, in the job's
        process (a Ray worker's stderr never reaches the job's log), and kept for the failure policy."""
        per_policy, tally = self.group.rollout.collect_part(seeds, group_ids, torch_seed, greedy)
        self._errors = _logged(tally.errors)
        return per_policy, tally.values()

    def episode_errors(self) -> list[str]:
        return list(self._errors)

    def sync_weights(self) -> None:
        for ctl in self.policies.values():
            ctl.sync_weights()

    def train_step(self, step: int) -> dict[str, float]:
        return self.rl_step(step)

    def rl_step(self, step: int) -> dict[str, float]:
        a = self.spec.algorithm
        rule_eval = self.setup.mapping.eval_vs_rule
        if rule_eval is not None and step == 1:  # the starting policies, before any update: step 0
            self.sink.metrics(0, self.evaluate_vs_rule(rule_eval.games))
        metrics = self._rl_step(step)
        if rule_eval is not None and (step % rule_eval.every_steps == 0 or step == a.steps):
            metrics.update(self.evaluate_vs_rule(rule_eval.games))
        return metrics

    def evaluate_vs_rule(self, n: int) -> dict[str, float]:
        """Every trained policy against the rule-based player in every role: greedy games on `n` held-out
        seeds (the same seeds each time, so the curve compares like with like)."""
        timer = PhaseTimer()
        with timer.phase("eval"):
            seeds = [derive_seed(self.spec.seed, -8, i) for i in range(n)]
            tallies = self.group.rollout.versus_rule_part(seeds)
            _logged(sorted({e for t in tallies.values() for e in t.errors}))
            stats = versus_rule_metrics(tallies)
        return {**{f"eval/{k}": v for k, v in stats.items()}, **timer.times}

    def _rl_step(self, step: int) -> dict[str, float]:
        """The step's phases: the games (rollout), then each policy's own step (its frozen log-probs,
        advantages, update and weight sync, timed by its controller and summed here)."""
        a = self.spec.algorithm
        timer = PhaseTimer()
        with timer.phase("rollout"):
            group_ids = [derive_seed(self.spec.seed, step, g) for g in range(a.batch_size)]
            seeds = [g for g in group_ids for _ in range(a.group_size)]  # a group = one game seed, k games
            per_policy, stats = self._play(seeds, seeds, derive_seed(self.spec.seed, step, -1))
        samples = [s for p in self.setup.trained for s in per_policy[p]]
        with timer.phase("rollout_log"):
            self.record_rollouts(step, samples, self.base_of)
        metrics = {**reward_metrics(samples), **stats}
        per: dict[str, dict[str, float]] = {}
        for name, ctl in self.policies.items():
            self.feeds[name].samples = per_policy[name]
            per[name] = ctl.rl_step(step)
        for key in POLICY_METRICS:
            values = [m[key] for m in per.values() if key in m]
            for name, m in per.items():
                if key in m:
                    metrics[f"policy/{name}/{key}"] = m[key]
            if values and key not in ("reward/mean", "response_length/mean"):
                extreme = {"ratio/max": max, "ratio/min": min}.get(key)
                metrics[key] = extreme(values) if extreme else sum(values) / len(values)
        n_gen = sum(s.n_generated for s in samples)
        for key in POLICY_PHASES:
            metrics[key] = sum(m.get(key, 0.0) for m in per.values())
        times = timer.metrics()
        metrics.update(times)
        metrics["tokens_per_s"] = n_gen / max(times["time/step"], 1e-9)
        metrics["rollout/tokens_per_s"] = n_gen / max(times["time/rollout"], 1e-9)
        return metrics

    def evaluate(self, n: int, *, step: int = 0) -> dict[str, float]:
        """Greedy games on held-out seeds: per-role reward means and win rates."""
        seeds = [derive_seed(self.spec.seed, -7, i) for i in range(n)]
        _, stats = self._play(seeds, list(range(n)), 0, True)
        return {f"eval/{k}": v for k, v in stats.items()}

    # ---- checkpoints: one step directory, a subdirectory per trained policy --------------------------------
    def save(self, step: int) -> None:
        if self.ckpt_prefix is None:
            return
        staging = Path(tempfile.mkdtemp(prefix="otk-ckpt-"))
        for name, view in self.views.items():
            payload = view.checkpoint_payload()
            checkpoint.write_model(
                staging / name,
                payload["weights"],
                payload["adapter"],
                payload["state"],
                payload["config"],
                payload["tokenizer"],
                payload["peft_config"],
            )
        meta = {
            "spec": self.spec.model_dump(mode="json"),
            "data": {"next_step": step + 1},
            "policies": self.setup.trained,
        }
        uri, files = checkpoint.publish(staging, self.ckpt_prefix, step, meta, self.spec.checkpoint.keep_last)
        self.sink.checkpoint(step, uri, files)

    def resume(self, uri: str) -> int:
        local = storage.download_prefix(checkpoint.resolve(uri))
        meta = json.loads((local / "meta.json").read_text())
        saved = meta.get("policies")
        if saved is None or sorted(saved) != sorted(self.setup.trained):
            raise ValueError(
                f"checkpoint {uri} holds policies {saved or 'of a single-agent job'}; "
                f"this job trains {', '.join(self.setup.trained)}"
            )
        for name, view in self.views.items():
            weights, adapter, state = checkpoint.read_model(local / name)
            view.load(weights, state, adapter)
        self.sink.log(f"resumed {', '.join(self.setup.trained)} from {uri} at step {meta['step']}")
        return int(meta["step"])
