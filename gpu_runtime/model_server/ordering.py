"""Per-model call ordering: each model's calls run in `seq_id` order whatever order they arrive in (the SDK
sends a large batch's chunks 2..n concurrently and chunk 1 last), and a retried `(model_id, seq_id)` is the
same call: it is answered from the kept outcome, never run twice. A retry whose payload differs from the
first is refused (a client bug, not a retry); payloads are compared by a fingerprint.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import OrderedDict
from typing import Any

import torch

from gpu_runtime.model_server.types import ModelServerError, Operation, Outcome

# Per model: how far back a retry is still answered. The SDK retries a call soon after sending it, and an
# outcome can hold a large batch's log-probs; the API keeps the durable copy (its futures).
KEEP_OUTCOMES = 64
# Per model: how far past the next seq_id a call may arrive. Calls far ahead would wait in memory for a turn
# that may never come; the API refuses them at MAX_SEQ_AHEAD (64, api/tinker/services.py), this is the
# model server's own, looser guard (the API's "next" is its view from the futures, a little behind).
SEQ_AHEAD_LIMIT = 256


def fingerprint(value: Any) -> str:
    """A digest of a request's content (dataclasses, containers, tensors, scalars), stable across copies."""
    h = hashlib.sha256()
    _feed(h, value)
    return h.hexdigest()


def _feed(h: Any, v: Any) -> None:
    if isinstance(v, torch.Tensor):
        t = v.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif dataclasses.is_dataclass(v) and not isinstance(v, type):
        h.update(f"D{type(v).__name__}".encode())
        for f in dataclasses.fields(v):
            h.update(f.name.encode())
            _feed(h, getattr(v, f.name))
    elif isinstance(v, dict):
        h.update(f"M{len(v)}".encode())
        for k in sorted(v, key=str):
            _feed(h, k)
            _feed(h, v[k])
    elif isinstance(v, list | tuple):
        h.update(f"L{len(v)}".encode())
        for x in v:
            _feed(h, x)
    else:
        h.update(f"S{type(v).__name__}:{v!r};".encode())


class SeqQueue:
    """One model's queue: calls waiting for their turn, and the outcomes of the last KEEP_OUTCOMES calls."""

    def __init__(
        self, first_seq_id: int = 1, keep: int = KEEP_OUTCOMES, ahead: int = SEQ_AHEAD_LIMIT
    ) -> None:
        self.next_seq_id = first_seq_id
        self.keep = keep
        self.ahead = ahead
        self.pending: dict[int, tuple[Operation, str]] = {}
        self.done: OrderedDict[int, tuple[str, Outcome]] = OrderedDict()

    def submit(self, seq_id: int, op: Operation) -> Outcome | None:
        """Queue a call. A retry of a finished call gets its outcome back; of a queued one, is absorbed."""
        fp = fingerprint(op)
        if seq_id in self.done:
            first, outcome = self.done[seq_id]
            self._same(seq_id, fp, first)
            return outcome
        if seq_id in self.pending:
            self._same(seq_id, fp, self.pending[seq_id][1])
            return None
        if seq_id < self.next_seq_id:
            raise ModelServerError(f"seq_id {seq_id} already ran and its outcome is no longer kept")
        if seq_id >= self.next_seq_id + self.ahead:
            raise ModelServerError(f"seq_id {seq_id} is too far ahead (next is {self.next_seq_id})")
        self.pending[seq_id] = (op, fp)
        return None

    @staticmethod
    def _same(seq_id: int, fp: str, first: str) -> None:
        if fp != first:
            raise ModelServerError(f"seq_id {seq_id} was already used for a different call")

    def ready(self) -> list[tuple[int, Operation]]:
        """The calls that may run now, in order: the one at next_seq_id and those queued right after it."""
        out = []
        seq = self.next_seq_id
        while seq in self.pending:
            out.append((seq, self.pending[seq][0]))
            seq += 1
        return out

    def complete(self, outcome: Outcome) -> None:
        if outcome.seq_id != self.next_seq_id:
            raise RuntimeError(f"completed seq_id {outcome.seq_id} out of turn (next is {self.next_seq_id})")
        _, fp = self.pending.pop(outcome.seq_id)
        self.done[outcome.seq_id] = (fp, outcome)
        self.next_seq_id += 1
        while len(self.done) > self.keep:
            self.done.popitem(last=False)

    def outcome(self, seq_id: int) -> Outcome | None:
        kept = self.done.get(seq_id)
        return kept[1] if kept else None
