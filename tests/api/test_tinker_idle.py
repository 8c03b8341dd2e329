"""A model server told to stop (SIGTERM, a driver's stop) parks its training clients (adapter, Adam state,
the seq_id they run next) under `--spill-uri`; the next model server takes each back on its next call, so the
official `tinker` SDK's client goes on as if nothing happened. The idle stop (`--idle-exit-s`) ends in the
same park; its timing rule is tested on a fake clock in tests/gpu_runtime/test_model_server_serve.py (here a
slow box's gap between two calls would stop the server early).

Actors: alice (owner of acme) only; these routes' tenancy is test_tinker_sdk's and test_tinker_isolation's."""

from __future__ import annotations

import subprocess
import urllib.parse

import pytest
import tinker
from tinker import types

from api.tinker.auth import sdk_key
from tests.api import tinker_live
from tests.api.tinker_live import BASE_MODEL, WAIT, datum

pytestmark = pytest.mark.django_db(transaction=True)
platform = tinker_live.platform
TOKENS = [ord(c) % 200 + 3 for c in "the cat sat on the mat."]
DATA = [datum(TOKENS)]
ADAM = types.AdamParams(learning_rate=1e-2)


def test_a_stopped_model_server_parks_its_clients_and_the_next_one_takes_them_back(
    platform, tmp_path, alice, acme, make_token
):
    key = sdk_key(make_token(alice, acme, scopes=["tinker"]))
    spill = ("--spill-uri", f"file://{tmp_path}/spill")
    proc = tinker_live.start_model_server(platform, extra=spill)
    try:
        service = tinker.ServiceClient(base_url=f"{platform}/tinker", api_key=key)
        trainer = service.create_lora_training_client(base_model=BASE_MODEL, rank=4, seed=0).result(
            timeout=WAIT
        )
        trainer.forward_backward(DATA, "cross_entropy").result(timeout=WAIT)
        trainer.optim_step(ADAM).result(timeout=WAIT)
        saved = trainer.save_state("before-idle").result(timeout=WAIT)
        # One model server per base model: a second one, started now, is refused and touches nothing.
        second = tinker_live.start_model_server(platform, extra=spill, stderr=subprocess.PIPE)
        _, err = second.communicate(timeout=WAIT)
        assert second.returncode == 1 and "model server not started: another model server" in err, err
        before = trainer.forward(DATA, "cross_entropy").result(timeout=WAIT).metrics["loss:sum"]
        # seq_ids 1-4 ran: the client runs 5 next.
        tinker_live.stop(proc)  # SIGTERM: parks
        assert proc.returncode == 0
        marker = tmp_path / "spill" / "next-seq" / urllib.parse.quote(trainer.model_id, safe="")
        assert marker.read_text() == "5"

        proc = tinker_live.start_model_server(platform, extra=spill)
        after = trainer.forward(DATA, "cross_entropy").result(timeout=WAIT).metrics["loss:sum"]
        assert after == pytest.approx(before, rel=1e-6)
        assert not marker.exists()  # taken back
        # Its Adam state came back too: the next step is the one a client resumed from save_state takes.
        resumed = service.create_training_client_from_state_with_optimizer(saved.path).result(timeout=WAIT)
        losses = []
        for client in (trainer, resumed):
            client.forward_backward(DATA, "cross_entropy").result(timeout=WAIT)
            client.optim_step(ADAM).result(timeout=WAIT)
            losses.append(client.forward(DATA, "cross_entropy").result(timeout=WAIT).metrics["loss:sum"])
        assert losses[0] == pytest.approx(losses[1], rel=1e-5)
        assert losses[0] != pytest.approx(before, rel=1e-3)  # it did take a step
    finally:
        tinker_live.stop(proc)  # SIGTERM: parks again
    assert proc.returncode == 0 and marker.read_text() == "9"  # seq_ids 5-8 ran on the second server
    service.close("success").result(timeout=WAIT)
