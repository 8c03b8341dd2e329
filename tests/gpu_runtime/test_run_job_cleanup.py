"""run_job's way out: a worker group whose shutdown raises must not cost the platform the job's last event."""

from __future__ import annotations

import types

import pytest

import gpu_runtime.controller as controller_mod
import gpu_runtime.groups as groups_mod
from gpu_runtime.cli import run_job


class Sink:
    def __init__(self) -> None:
        self.closed = False
        self.events: list[str] = []

    def event(self, kind: str, **_: object) -> None:
        self.events.append(kind)

    def log(self, _line: str) -> None:
        pass

    def close(self) -> None:
        self.closed = True


class BrokenShutdown:
    def __init__(self, _spec) -> None:
        pass

    def shutdown(self) -> None:
        raise RuntimeError("a rank died unnoticed")


class Done:
    def __init__(self, *_args) -> None:
        pass

    def run(self, **_kwargs):
        return types.SimpleNamespace(exit_code=0)


def test_a_group_shutdown_that_raises_still_closes_the_sink(monkeypatch):
    monkeypatch.setattr(groups_mod, "LocalGroup", BrokenShutdown)
    monkeypatch.setattr(controller_mod, "Controller", Done)
    sink = Sink()
    with pytest.raises(RuntimeError, match="died unnoticed"):
        run_job(types.SimpleNamespace(multi_agent=None, environment=None), sink, "prefix")
    assert sink.closed  # the sink's buffered events (the final one among them) are flushed
