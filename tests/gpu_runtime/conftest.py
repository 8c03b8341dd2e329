from __future__ import annotations

import os

import pytest
import torch

from opentinker.spec import JobSpec, example_rl_spec


@pytest.fixture(autouse=True)
def _one_thread():
    # 2-core CI: one torch thread per process avoids OpenMP teams spinning against each other.
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def small_spec(*, lora: dict | None = None, **algorithm) -> JobSpec:
    """The example job, shrunk: 2 prompts x 2 samples, 4 new tokens."""
    base = example_rl_spec().model_dump()
    base["model"]["lora"] = lora
    base["algorithm"].update(dict(steps=3, batch_size=2, group_size=2, max_new_tokens=4, micro_batch_size=2))
    base["algorithm"].update(algorithm)
    base["checkpoint"].update(every_steps=2, keep_last=5)
    return JobSpec.model_validate(base)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (starting Ray costs seconds): a cluster of two nodes on this
    machine (Ray's own test cluster, ~15 s), so that jobs can be spread across nodes. Two CPUs each (as the
    single node had before: a GPU job's colocated bundle asks for 2); the machine's GPUs on the head only."""
    import ray
    from ray.cluster_utils import Cluster

    # A head node turns token auth on when ~/.ray/auth_token exists (any local ray.init() writes one), and
    # then refuses the second node: a loopback-only test cluster goes without.
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    node = {"num_cpus": 2, "object_store_memory": 80_000_000}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    try:
        cluster.add_node(**node, num_gpus=0)
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        yield ray
    finally:
        ray.shutdown()
        cluster.shutdown()
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved
