"""Multi-agent jobs with several rollout workers (issue 14 item 3): the step's games split in parts, the
statistics pooled by game and move counts, the limits checked at submission. The job-level parity (2 workers
train both policies as 1 does) is in test_multiagent_jobs.py, beside its warm start."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from gpu_runtime.game_stats import Tally, game_tally, merged, policy_game_tally, versus_rule_metrics
from gpu_runtime.multiagent import MultiAgentRolloutWorker, game_stats, policy_game_stats
from gpu_runtime.multiagent_pool import MultiAgentRolloutPool, split_evenly
from opentinker.spec import JobSpec
from tests.gpu_runtime.test_multiagent_eval import Stubborn, play, spec
from tests.gpu_runtime.test_multiagent_games import BoardEngine


def test_pooled_rates_weigh_every_game_and_move_not_every_worker():
    engines = {"first": BoardEngine("first"), "stubborn": Stubborn()}
    x_wins, o_wins = {"x": "first", "o": "stubborn"}, {"x": "stubborn", "o": "first"}
    seatings = [x_wins, o_wins, x_wins]
    games = play(seatings, engines)
    assert [g.info["winner"] for g in games] == ["x", "o", "x"]  # the precondition: outcomes differ
    whole = game_stats(games, ["x", "o"]) | policy_game_stats(games, seatings, ["first", "stubborn"])

    def part(lo: int, hi: int) -> Tally:
        return game_tally(games[lo:hi], ["x", "o"]).merge(
            policy_game_tally(games[lo:hi], seatings[lo:hi], ["first", "stubborn"])
        )

    pooled = merged([part(0, 2), part(2, 3)]).values()  # an uneven split: 2 games and 1
    assert pooled.keys() == whole.keys()
    assert pooled == pytest.approx(whole, rel=1e-12)
    assert pooled["game/x/win_rate"] == pytest.approx(2 / 3) and pooled["episodes/total"] == 3.0
    # A mean of the two workers' means weighs the lone game of the second worker double: another number.
    a, b = part(0, 2).values(), part(2, 3).values()
    for key in ("game/x/win_rate", "game/o/illegal_rate", "reward/x/mean", "game/rounds/mean"):
        assert (a[key] + b[key]) / 2 != pytest.approx(pooled[key]), key
    # A rate no game of a part had (no moves of that kind) is left out of it, not counted as 0.
    t = Tally()
    t.rate("r", 0, 0)
    assert t.values() == {} and merged([t, part(2, 3)]).values() == part(2, 3).values()


def test_rule_player_evaluation_pools_its_parts():
    engines = {"first": BoardEngine("first"), "stubborn": Stubborn()}
    games = play([{"x": "first", "o": None}] * 3, engines)  # "first" as x against the rule player
    whole = versus_rule_metrics({("first", "x"): game_tally(games, ["x", "o"])})
    parts = merged([game_tally(games[:1], ["x", "o"]), game_tally(games[1:], ["x", "o"])])
    assert versus_rule_metrics({("first", "x"): parts}) == pytest.approx(whole, rel=1e-12)
    assert {"vs_rule/first/x/win_or_draw", "vs_rule/first/x/failed", "vs_rule/first/reward"} <= whole.keys()


def test_split_evenly():
    assert split_evenly(5, 2) == [range(0, 3), range(3, 5)]
    assert split_evenly(1, 3) == [range(0, 1), range(1, 1), range(1, 1)]


def test_two_workers_play_the_games_one_worker_plays():
    """Parts know their first game and group: the same seats (rotate_roles and rule_mix count groups across
    the step), the same per-request seeds (T = 1), samples per policy in the same order, the same games'
    indices; and the evaluation against the rule player split over both workers gives one worker's
    numbers. A random tiny model: the tokens, not the outcomes, tell a wrong seed or seat."""
    js = spec(rotate_roles=True, rule_mix=0.34).model_dump_json()
    workers = [MultiAgentRolloutWorker(js) for _ in range(2)]
    groups = [10, 10, 11, 11, 12, 12]  # 3 groups of 2 games: parts of 2 groups and 1
    seeds = [1, 1, 2, 2, 3, 3]
    one, one_stats = workers[0].collect(seeds, groups, torch_seed=5)
    pool = MultiAgentRolloutPool(workers)
    two, two_stats = pool.collect(seeds, groups, torch_seed=5)
    # The third group plays against the rule player: alice alone, as x (no sample for the rule's seat).
    assert [s.role for s in one["alice"]] == ["x", "x", "o", "o", "x", "x"]
    assert [s.role for s in one["bob"]] == ["o", "o", "x", "x"]

    def view(per_policy):
        return {
            p: [(s.token_ids, s.group_id, s.role, s.trace.game) for s in ss] for p, ss in per_policy.items()
        }

    def tokens(per_policy):
        return {p: [s.token_ids for s in v] for p, v in per_policy.items()}

    assert tokens(two) == tokens(one)  # the per-request seeds of the step-wide game index
    assert view(two) == view(one)
    assert one["alice"][0].token_ids != one["alice"][1].token_ids  # sampled: a group's games differ
    assert two_stats == pytest.approx(one_stats)
    assert MultiAgentRolloutPool(workers).versus_rule([4, 5, 6]) == pytest.approx(
        workers[1].versus_rule([4, 5, 6])
    )


def test_rollout_workers_of_a_multi_agent_job_validated_at_submission():
    body = spec(rotate_roles=True).model_dump(mode="json")  # two trained policies
    body["algorithm"]["batch_size"] = 2
    body["resources"].update(rollout_workers=2)
    assert JobSpec.model_validate(body).resources.rollout_workers == 2  # CPUs: no refusal any more
    body["resources"].update(gpus=3)  # 2 policies x 1 rank + 2 workers
    with pytest.raises(
        ValueError, match=r"multi-agent job on GPUs .* resources\.gpus must be at least 4, not 3"
    ):
        JobSpec.model_validate(body)
    body["resources"].update(gpus=4)
    assert JobSpec.model_validate(body).resources.gpus == 4
    body["resources"].update(gpus=0, rollout_workers=3)  # more workers than the step's game groups
    with pytest.raises(ValueError, match=r"rollout_workers \(3\) must not exceed the step's groups \(2\)"):
        JobSpec.model_validate(body)


def test_why_games_failed_reaches_the_job_from_every_worker(capsys):
    """A worker's stderr (a Ray actor's) never reaches the job's log: the reasons come back with the
    tallies, merged over the parts, and the job's process logs them and names them when the failure
    policy stops the job (here an eval job whose every game failed, on two workers failing differently)."""
    from gpu_runtime.failure_policy import FailureWatch
    from gpu_runtime.multiagent import MultiAgentController, resolve
    from gpu_runtime.sink import JsonlSink

    job = spec()
    workers = [MultiAgentRolloutWorker(job.model_dump_json()) for _ in range(2)]
    for k, w in enumerate(workers):

        def down(k=k):
            raise ConnectionError(f"game server {k} unreachable")

        w.make_env = down
    setup = resolve(job)
    group = SimpleNamespace(
        setup=setup,
        ranks={p: SimpleNamespace(world_size=1) for p in setup.trained},
        rollout=MultiAgentRolloutPool(workers),
    )
    controller = MultiAgentController(job, JsonlSink(), group, None)  # type: ignore[arg-type]
    m = controller.evaluate(4)
    assert m["eval/episodes/failed"] == m["eval/episodes/total"] == 4.0  # the precondition
    reason = FailureWatch(job, controller.episode_errors).after_eval(m)
    assert reason is not None and "game server 0 unreachable" in reason and "game server 1" in reason
    logged = [line for line in capsys.readouterr().err.splitlines() if line.startswith("game failed")]
    assert len(logged) == 2 and all("unreachable" in line for line in logged)


def test_every_policy_group_is_stopped_when_one_fails_to(monkeypatch):
    """A policy whose placement fails stops the policies placed before it; a group that fails to stop (a rank
    lost unnoticed) does not leave the next policy's ranks and placement group, or the rollout actors,
    running in the shared cluster."""
    import gpu_runtime.multiagent as ma

    stopped: list[str] = []

    class Ranks:  # a policy's RayGroup
        def __init__(self, spec, world_size, rollout=True, cpus=None):
            if stopped or len(placed) == 1:
                raise RuntimeError("the cluster could not place the second policy within 120 s")
            self.name = f"ranks {len(placed)}"
            placed.append(self)

        def shutdown(self):
            stopped.append(self.name)
            if self.name == "ranks 0" and len(placed) == 2:
                raise RuntimeError("trainer rank 0 was lost")

    placed: list[Ranks] = []
    monkeypatch.setattr(ma, "RayGroup", Ranks)
    with pytest.raises(RuntimeError, match="could not place the second policy"):
        ma.MultiAgentGroup(spec(), use_ray=True)  # two trained policies
    assert stopped == ["ranks 0"]

    group = ma.MultiAgentGroup.__new__(ma.MultiAgentGroup)
    stopped.clear()
    group.ranks = {"alice": placed[0], "bob": Ranks.__new__(Ranks)}
    group.ranks["bob"].name = "ranks 1"
    placed.append(group.ranks["bob"])
    group.ray = SimpleNamespace(kill=lambda actor: stopped.append(actor))
    group.rollout_actors = ["worker 0", "worker 1"]
    with pytest.raises(RuntimeError, match="was lost"):
        group.shutdown()
    assert stopped == ["ranks 0", "ranks 1", "worker 0", "worker 1"]


def test_the_policies_ray_groups_split_the_jobs_cpus(monkeypatch):
    """Each trained policy's placement group reserves its share of the admitted CPUs, not all of them (two
    policies asked the shared cluster for twice what the scheduler admitted)."""
    import gpu_runtime.multiagent as ma

    asked: list[float] = []

    class Ranks:  # a policy's RayGroup; the second stops the construction before any actor starts
        def __init__(self, spec, world_size, rollout=True, cpus=None):
            asked.append(spec.resources.cpus if cpus is None else cpus)
            if len(asked) == 2:
                raise RuntimeError("stop here")

        def shutdown(self):
            pass

    monkeypatch.setattr(ma, "RayGroup", Ranks)
    job = JobSpec.model_validate({**spec().model_dump(), "resources": {"cpus": 3}})
    with pytest.raises(RuntimeError, match="stop here"):
        ma.MultiAgentGroup(job, use_ray=True)  # two trained policies
    assert asked == [1.5, 1.5]
