"""What every pool driver is and shares: the interface the supervisor and the launcher call, what a launch
returns, and the runtime's command line.

Kept apart from the package's ``__init__`` (which picks a driver), so ``local`` and ``ray`` import no module
that imports them.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from django.conf import settings

from portal.models import Allocation, ComputePool
from portal.services.pools import PoolCapacity


def runtime_command() -> list[str]:
    """The job entrypoint; the spec file's path is appended."""
    configured = settings.OPENTINKER_RUNTIME_COMMAND
    if configured:
        return [str(x) for x in configured]
    return [sys.executable, "-m", "gpu_runtime", "run"]


@dataclass(frozen=True)
class Launched:
    """Where a launched runtime is: the driver's handle for it (a process group id, a Ray submission id) and
    the host or cluster that handle means something on."""

    handle: str
    host: str


class Driver(ABC):
    """How a job's runtime is started, watched and stopped on one pool (``driver_for`` picks the class by
    the pool's ``driver``). The supervisor asks the driver; it never branches on the pool's kind."""

    # The job's failure detail when the allocation's heartbeat stops: who stopped reporting.
    lost_detail: ClassVar[str]

    def __init__(self, pool: ComputePool) -> None:
        self.pool = pool

    @abstractmethod
    def capacity(self) -> PoolCapacity:
        """The pool's resources, read from the pool itself; raises when they cannot be read (pool down)."""

    @abstractmethod
    def launch(self, alloc: Allocation, work_dir: Path, spec_path: Path, env: dict[str, str]) -> Launched:
        """Start the runtime of ``alloc`` with ``spec_path`` and ``env``. Raises when it could not start."""

    @abstractmethod
    def stop(self, alloc: Allocation, *, grace_s: float = 0) -> bool:
        """Ask the runtime to checkpoint and exit (SIGTERM). Returns whether the request reached it."""

    @abstractmethod
    def kill(self, alloc: Allocation) -> bool:
        """End the runtime now (the reaper's last word). Returns whether the signal reached it."""

    @abstractmethod
    def alive(self, alloc: Allocation) -> bool | None:
        """Whether the runtime still runs; None when it cannot be told from here."""

    def follow(self, alloc: Allocation) -> bool:
        """One supervisor pass's look at a launched runtime: heartbeat the allocation while it lives, record
        its outcome once it has ended. Returns True when the outcome was recorded; otherwise
        ``alloc.heartbeat_at`` is current for the reaper. The default is for drivers whose runtime has a
        runner of its own that does all this (``local``): nothing to look at."""
        return False
