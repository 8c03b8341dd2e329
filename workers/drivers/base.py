"""What every pool driver shares: the runtime's command line and the shape of a capacity report.

Kept apart from the package's ``__init__`` (which picks a driver), so ``local`` and ``ray`` import no module
that imports them.
"""

from __future__ import annotations

import sys

from django.conf import settings


def runtime_command() -> list[str]:
    """The job entrypoint; the spec file's path is appended."""
    configured = settings.OPENTINKER_RUNTIME_COMMAND
    if configured:
        return [str(x) for x in configured]
    return [sys.executable, "-m", "gpu_runtime", "run"]


def capacity_report(gpus_by_type: dict[str, int], cpus: int, memory_bytes: int, slots: int = 0) -> dict:
    """What a driver reports of its pool: GPUs by type or, without any GPU, CPU slots (``slots``, default
    one per CPU)."""
    cpu_slots = not gpus_by_type
    kinds = gpus_by_type or {"cpu-slot": slots or cpus}
    return {
        "gpus_by_type": kinds,
        "total_gpus": sum(kinds.values()),
        "cpus": cpus,
        "memory_bytes": memory_bytes,
        "cpu_slots": cpu_slots,
    }
