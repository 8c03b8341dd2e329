"""The real runtime (``python -m gpu_runtime run <spec.json>``) with a gate that a fault test controls.

``gated_runtime.py GATE K <spec.json>``: after the metrics of step K are posted, the runtime waits until the
file GATE exists, then goes on. A test injects its fault while the job certainly is mid-way, however fast the
machine, and creates GATE to let it go on (a resumed attempt, started after GATE exists, does not wait).
The wait gives up after 300 s, so a test that fails before opening the gate leaves no runtime behind for long.
Nothing else differs from the real runtime.
"""

from __future__ import annotations

import os
import sys
import time

from gpu_runtime import cli, sink

MAX_WAIT_S = 300.0


def main() -> int:
    gate, hold_after, spec = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    post = sink.HttpSink.metrics

    def metrics(self, step, values):
        post(self, step, values)
        deadline = time.monotonic() + MAX_WAIT_S
        while step == hold_after and not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.05)

    sink.HttpSink.metrics = metrics
    return cli.main(["run", spec])


if __name__ == "__main__":
    sys.exit(main())
