"""The test session's one Ray cluster, shared by every test that needs Ray (fixtures imported by the root
conftest): `ray_session` for the runtime's Ray actors, `ray_job_api` for the `ray` pool driver, which talks to
the same cluster through its Job Submission API (the dashboard). Starting Ray costs seconds and memory on a
2-core box: never a second one in the same session."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_dashboard: dict[str, str] = {}
LOOPBACK_NODE_IP = "127.0.0.2"


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session: a cluster of two nodes on this machine (Ray's own test
    cluster, ~15 s), so that jobs can be spread across nodes. Two CPUs each (as the single node had before: a
    GPU job's colocated bundle asks for 2); the machine's GPUs on the head only. The head serves the Job
    Submission API on a loopback port (`ray_job_api`), so a `ray` pool can be this cluster."""
    import ray
    from ray.cluster_utils import Cluster

    # A head node turns token auth on when ~/.ray/auth_token exists (any local ray.init() writes one), and
    # then refuses the second node: a loopback-only test cluster goes without.
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    # Loopback only: Ray turns 127.0.0.1 (and "localhost") into the machine's network address, any other
    # 127/8 address it keeps, so every node, the GCS and the object transfers stay on the loopback device.
    node = {"num_cpus": 2, "object_store_memory": 80_000_000, "node_ip_address": LOOPBACK_NODE_IP}
    port = _free_port()
    # A temp dir of its own (short: Ray's socket paths have a length limit): Ray jobs find their cluster
    # through `<temp dir>/ray_current_cluster` ("auto"), which in the shared /tmp/ray names the cluster
    # started last on this machine, another test session's while two run at once.
    temp = tempfile.mkdtemp(prefix="otrs-", dir="/tmp")
    head = {
        **node,
        "include_dashboard": True,
        "dashboard_host": "127.0.0.1",
        "dashboard_port": port,
        "temp_dir": temp,
    }
    # Ray's test cluster also writes the head's address to the default temp dir's `ray_current_cluster`,
    # whatever temp dir the node has, and fails where that directory does not exist (a machine that never ran
    # Ray: a fresh CI machine).
    os.makedirs(os.path.dirname(ray._private.utils.get_ray_address_file(None)), exist_ok=True)
    cluster = Cluster(initialize_head=True, head_node_args=head)
    try:
        cluster.add_node(**node, num_gpus=0)
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        _dashboard["url"] = f"http://127.0.0.1:{port}"
        yield ray
    finally:
        _dashboard.clear()
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved


@pytest.fixture(scope="session")
def ray_job_api(ray_session) -> str:
    """The session cluster's Job Submission API (its dashboard's URL): a `ray` pool's `ray_address`."""
    import httpx
    from ray.job_submission import JobSubmissionClient

    from tests.workers.ray_cluster import wait_for

    url = _dashboard["url"]
    # The dashboard may still be starting when the nodes are up, and then refuse submissions for a while
    # ("No available agent to submit job"): a no-op job accepted and run says it takes them now.
    wait_for(lambda: httpx.get(f"{url}/api/version", timeout=5).status_code == 200, 60, "the Ray Job API")
    client = JobSubmissionClient(url)
    noop = {"entrypoint": "true", "entrypoint_num_cpus": 0}
    probe = wait_for(lambda: client.submit_job(**noop), 120, "a Ray job agent")
    done = {"SUCCEEDED", "FAILED", "STOPPED"}
    wait_for(lambda: str(client.get_job_status(probe)) in done, 120, "the Ray Job API's probe job")
    return url
