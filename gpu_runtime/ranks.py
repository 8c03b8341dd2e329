"""Trainer ranks as processes of this machine, without Ray (as torchrun starts them): `SpawnedGroup`.

The job's runtime process is rank 0: it runs the controller, the rollout worker and rank 0's `RankWorker`,
and starts ranks 1..N-1 as `python -m gpu_runtime rank` children (the spec on their stdin, never in a file or
a process listing). They meet at `127.0.0.1` and the port rank 0's store already listens on (`open_store`:
bound before the followers learn it, so nothing can take it between), in a gloo process group on CPU or
NCCL on GPUs (rank r sees the r-th of the GPUs this process was given). Each call the
controller makes on the ranks goes to them over a gloo group of its own (`scatter_object_list`: each rank's
arguments; `gather_object`: their results), so a follower does exactly what rank 0 does, in the same order.

Lifetime: the children are in rank 0's process group (the platform's runner stops and kills the whole group)
and die with rank 0 (`PR_SET_PDEATHSIG`); they ignore SIGTERM (rank 0 decides when the job ends). A follower
that dies ends rank 0 at once, saying which rank and how: exit code 1 (the job fails with that reason) when it
exited with an error, killed by SIGKILL like it (the platform re-queues a lost runtime) when a signal ended
it. At the end rank 0 tells them to leave the process group the way `RankWorker.shutdown` does (trainer
dropped and collected before `destroy_process_group`) and waits for their exit code 0.

The objects that travel (samples, loss norms, results) are the job's own, between processes of one job, as
they would through Ray; nothing a tenant wrote is unpickled here.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch.distributed as dist

from gpu_runtime.groups import WorkerGroup
from gpu_runtime.workers import RankWorker, RolloutWorker, open_store
from opentinker.spec import JobSpec

T = TypeVar("T")

# Never in a follower's environment: it trains, it neither reports nor reaches the environment.
SECRET_VARS = ("OPENTINKER_JOB_TOKEN", "OPENTINKER_ENV_SECRET", "OPENTINKER_BOOTSTRAP_TOKEN")


def _control_timeout(spec: JobSpec) -> datetime.timedelta:
    # Followers wait on the control group while rank 0 rolls out, evaluates and checkpoints alone: as long as
    # the job may run, never gloo's default 30 minutes.
    return datetime.timedelta(hours=spec.resources.max_hours) + datetime.timedelta(minutes=10)


def _follower_env(rank: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SECRET_VARS}
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if visible:  # rank r on the r-th GPU this job was given (rank 0 uses the first)
        env["CUDA_VISIBLE_DEVICES"] = visible[rank] if rank < len(visible) else ""
    env["PYTHONUNBUFFERED"] = "1"
    return env


class SpawnedGroup(WorkerGroup):
    """`world_size` trainer ranks: rank 0 in this process, the others child processes (module docstring)."""

    def __init__(self, spec: JobSpec, world_size: int) -> None:
        if world_size < 2:
            raise ValueError("a spawned group has at least two ranks")
        if spec.resources.rollout_workers > 1:
            raise ValueError("several rollout workers run on Ray: spawned ranks have one in process")
        self.world_size = world_size
        self._closing = False
        self._in_call = False
        # Rank 0 (this process) listens first, on a port the OS gives it: the followers learn a held port.
        store = open_store("127.0.0.1", world_size)
        master = f"127.0.0.1:{store.port}"
        js = spec.model_dump_json()
        self.procs: list[subprocess.Popen[bytes]] = []
        try:
            for r in range(1, world_size):
                cmd = [sys.executable, "-m", "gpu_runtime", "rank", str(r), str(world_size), master]
                cmd.append(str(os.getpid()))
                # Their stdout goes to stderr: rank 0's stdout may be the job's JSONL record stream.
                proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=2, env=_follower_env(r))
                assert proc.stdin is not None
                proc.stdin.write(js.encode())
                proc.stdin.close()
                self.procs.append(proc)
            for r, proc in enumerate(self.procs, 1):
                threading.Thread(target=self._watch, args=(r, proc), daemon=True, name=f"rank-{r}").start()
            self.worker = RankWorker(js, 0, world_size, master, store)
            self.ctrl = dist.new_group(backend="gloo", timeout=_control_timeout(spec))
        except BaseException:
            self._kill()
            raise
        # SFT without an environment has nothing to roll out.
        self.rollout = RolloutWorker(js) if spec.environment is not None else None

    def _watch(self, rank: int, proc: subprocess.Popen[bytes]) -> None:
        code = proc.wait()
        if self._closing:
            return
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        # Last on stderr: the platform's runner keeps the stderr tail as the failed job's reason.
        print(f"job failed: trainer rank {rank} {how}", file=sys.stderr, flush=True)
        if code < 0:  # lost like a killed runtime: the platform re-queues it
            os.kill(os.getpid(), signal.SIGKILL)
        os._exit(1)

    def _on_ranks(self, method: Callable[..., T], per_rank: Sequence[tuple[Any, ...]]) -> list[T]:
        args = list(per_rank)
        self._in_call = True  # until every rank answered: a follower may be inside a collective
        # Rank 0 keeps its own arguments; only the followers' are sent.
        calls: list[Any] = [(method.__name__, ())] + [(method.__name__, a) for a in args[1:]]
        dist.scatter_object_list([None], calls, src=0, group=self.ctrl)
        mine = method(self.worker, *args[0])
        results: list[Any] = [None] * self.world_size
        dist.gather_object(None, results, dst=0, group=self.ctrl)
        results[0] = mine
        self._in_call = False
        return results

    def leave_process_group(self) -> None:
        """Every rank leaves the process group (followers then exit 0)."""
        if self._closing:
            return
        self._closing = True
        dist.scatter_object_list([None], [(None, ())] * self.world_size, src=0, group=self.ctrl)
        self.worker.shutdown()

    def shutdown(self) -> None:
        if self._closing and not self.procs:
            return
        try:
            if self._in_call:  # a call failed here while the followers may be inside its collectives
                self._kill()
                for proc in self.procs:
                    proc.wait()
                # Its trainer dropped and collected before the group goes, as RankWorker.shutdown does.
                del self.worker
                gc.collect()
                with contextlib.suppress(Exception):
                    dist.destroy_process_group()
            else:
                self.leave_process_group()
        finally:
            clean = not self._in_call
            for r, proc in enumerate(self.procs, 1):
                try:
                    code = proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    code = proc.wait()
                if clean and code != 0:  # the job's work is done; said in its log, not hidden
                    what = f"trainer rank {r} ended with code {code} after the job"
                    print(what, file=sys.stderr, flush=True)
            self.procs = []

    def _kill(self) -> None:
        self._closing = True
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()


def follow(rank: int, world_size: int, master: str) -> int:
    """A follower rank (`python -m gpu_runtime rank`, after `die_with_parent`): join the ranks, then run what
    rank 0 sends until it says stop. The spec comes on stdin."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # rank 0 ends the job; the runner kills what is left
    spec_json = sys.stdin.read()
    spec = JobSpec.model_validate_json(spec_json)
    worker = RankWorker(spec_json, rank, world_size, master)
    ctrl = dist.new_group(backend="gloo", timeout=_control_timeout(spec))
    while True:
        box: list[Any] = [None]
        dist.scatter_object_list(box, None, src=0, group=ctrl)
        name, args = box[0]
        if name is None:
            break
        result = getattr(worker, name)(*args)
        dist.gather_object(result, None, dst=0, group=ctrl)
    worker.shutdown()
    return 0
