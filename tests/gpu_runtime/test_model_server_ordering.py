"""The per-model seq_id queue refuses calls too far ahead of the next one (they would wait in the shared model
server's memory for a turn that may never come)."""

from __future__ import annotations

import pytest

from gpu_runtime.model_server.ordering import SeqQueue
from gpu_runtime.model_server.types import AdamParams, ModelServerError, OptimStep


def test_a_seq_id_far_ahead_is_refused():
    q = SeqQueue(first_seq_id=1, ahead=4)
    step = OptimStep(AdamParams())
    assert q.submit(4, step) is None  # within the window: waits for 1..3
    with pytest.raises(ModelServerError, match="too far ahead"):
        q.submit(5, step)
    assert q.pending.keys() == {4}
