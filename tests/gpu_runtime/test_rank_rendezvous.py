"""How trainer ranks meet and how a failed rank ends the job, without starting ranks.

- Rendezvous: rank 0 listens before the followers learn the port (`open_store`, port 0: the OS gives one as
  it binds), so a port cannot be taken between its choice and the bind, as a port picked free first and
  bound later can (torchrun's `MASTER_PORT` race; the Ray path's old free-port task had it too).
- A rank that fails a call on Ray ends the wait at once, whatever the other ranks still wait for in a
  collective: its process gone is `RankLost` (the job is re-queued), an exception it raised fails the job.
The real runs: tests/workers/test_trainer_ranks.py (local pool), tests/workers/test_trainer_ranks_ray.py.
"""

from __future__ import annotations

import datetime
import socket

import pytest
import torch.distributed as dist

from gpu_runtime.groups import RankLost, RayGroup
from gpu_runtime.workers import open_store

# bench/gpu_check.sh collects tests/gpu_runtime in the GPU image, which has no Ray.
ray = pytest.importorskip("ray")


def test_the_port_the_followers_are_told_is_held_by_rank_0_already():
    store = open_store("127.0.0.1", 2)
    # Nothing else can take it now: binding it fails, however fast another process is. (A port found free by
    # binding port 0 and closing, as before, passes no such check: it is free for anyone until rank 0 binds.)
    with socket.socket() as squatter, pytest.raises(OSError):
        squatter.bind(("127.0.0.1", store.port))
    follower = dist.TCPStore(
        "127.0.0.1", store.port, 2, is_master=False, timeout=datetime.timedelta(seconds=60)
    )
    follower.set("rank 1", "here")
    assert store.get("rank 1") == b"here"


class _Ref:
    def __init__(self, rank: int, outcome) -> None:
        self.rank, self.outcome = rank, outcome  # outcome: a value, an exception, or None: never ready


class _FakeRay:
    """`ray.wait`/`ray.get` over refs whose outcome is fixed; a ref that never becomes ready (a rank stuck
    in a collective with a dead one) fails the test if it is waited on."""

    exceptions = ray.exceptions

    def wait(self, refs, num_returns=1, timeout=None):
        ready = [r for r in refs if r.outcome is not None][:num_returns]
        assert ready or timeout is not None, "waited on ranks that will never answer"
        return ready, [r for r in refs if r not in ready]  # with a timeout: as if it ran out

    def get(self, ref):
        assert ref.outcome is not None, "blocked on a rank that will never answer"
        if isinstance(ref.outcome, BaseException):
            raise ref.outcome
        return ref.outcome


def _group() -> RayGroup:
    group = object.__new__(RayGroup)  # only what `_wait` uses: no cluster, no actors
    group.ray, group.world_size, group._failed = _FakeRay(), 2, False
    return group


def test_a_rank_killed_mid_collective_ends_the_call_at_once_as_lost():
    group = _group()
    # Rank 0 waits in the collective for rank 1, whose process is gone.
    with pytest.raises(RankLost, match="trainer rank 1 was lost: The actor died"):
        group._wait([_Ref(0, None), _Ref(1, ray.exceptions.ActorDiedError())])
    assert group._failed  # shutdown then kills the ranks instead of asking them to leave in order


def test_an_error_in_a_rank_fails_the_job_with_that_error():
    group = _group()
    error = ValueError("bad shard")
    with pytest.raises(ValueError, match="bad shard") as raised:
        group._wait([_Ref(0, None), _Ref(1, error)])
    assert raised.value is error and not isinstance(raised.value, RankLost) and group._failed
    ok = _group()
    assert ok._wait([_Ref(0, {"loss": 1.0}), _Ref(1, {"loss": 2.0})]) == [{"loss": 1.0}, {"loss": 2.0}]
    assert not ok._failed


def test_a_rank_whose_peer_died_under_it_in_a_collective_reports_the_loss_not_its_own_error():
    # Rank 1 is killed inside a collective: rank 0's gloo fails at once ("Connection closed by peer"), and
    # that error can come back before Ray reports rank 1's actor dead. The job is lost (re-queued), not
    # failed.
    group = _group()
    gloo = RuntimeError("[gloo] Connection closed by peer [127.0.0.2]:41235")
    with pytest.raises(RankLost, match="trainer rank 1 was lost") as raised:
        group._wait([_Ref(0, gloo), _Ref(1, ray.exceptions.ActorDiedError())])
    assert raised.value.__cause__ is gloo and group._failed
