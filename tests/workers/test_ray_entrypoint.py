"""The Ray driver's entrypoint reservation: what a job's driver process holds on the pool's cluster."""

from __future__ import annotations

from types import SimpleNamespace

from workers.drivers.ray import ENTRYPOINT_CPU_TOKEN, entrypoint_resources


def test_the_ray_entrypoint_holds_the_jobs_resources_only_when_it_runs_everything():
    gpu_pool = SimpleNamespace(pool=SimpleNamespace(cpu_slots=False), gpus=3)
    cpu_pool = SimpleNamespace(pool=SimpleNamespace(cpu_slots=True), gpus=0)
    in_process = {"resources": {"gpus": 3, "rollout_workers": 1}}
    assert entrypoint_resources(in_process, gpu_pool) == {"entrypoint_num_cpus": 0, "entrypoint_num_gpus": 3}
    assert entrypoint_resources(in_process, cpu_pool) == {"entrypoint_num_cpus": 1, "entrypoint_num_gpus": 0}
    # Several rollout workers: the runtime's placement group takes the admitted GPUs/CPUs, not both.
    token = {"entrypoint_num_cpus": ENTRYPOINT_CPU_TOKEN, "entrypoint_num_gpus": 0}
    placed = {"resources": {"gpus": 3, "rollout_workers": 2}}
    assert entrypoint_resources(placed, gpu_pool) == token
    assert entrypoint_resources(placed, cpu_pool) == token
    # Several trainer ranks: Ray actors in that placement group too.
    ranks = {"resources": {"gpus": 3, "trainer_ranks": 2}}
    assert entrypoint_resources(ranks, gpu_pool) == token
    assert entrypoint_resources(ranks, cpu_pool) == token
    assert 0 < ENTRYPOINT_CPU_TOKEN <= 0.05
