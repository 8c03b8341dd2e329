"""Restarting the model server mid-session, with the official `tinker` SDK: a real model server process is
killed (SIGKILL) and a new one started on the same queue.

- Acknowledged work is kept: finished futures (PostgreSQL) still answer; a saved state (object storage) still
  loads into a new training client with the same loss; a sampling client on saved weights still samples, the
  same tokens for the same seed (the new server re-creates it from what its `sample` carries).
- A call in flight (taken from the queue by the dead server, not finished) fails clearly, with category
  `server`, never stays pending; so does the next call of a training client the dead server held in memory.

Actors: alice (owner of acme) only; these routes' tenancy is test_tinker_sdk's and test_tinker_isolation's."""

from __future__ import annotations

import pytest
import tinker
from tinker import types

from api.tinker import queue
from api.tinker.auth import sdk_key
from api.tinker.models import TinkerFuture
from tests.api import tinker_live
from tests.api.tinker_live import BASE_MODEL, WAIT, datum, post, settled

pytestmark = pytest.mark.django_db(transaction=True)
platform = tinker_live.platform
TOKENS = [ord(c) % 200 + 3 for c in "the cat sat on the mat."]
DATA = [datum(TOKENS)]


def test_model_server_restart_keeps_acknowledged_work_and_fails_lost_calls(platform, alice, acme, make_token):
    key = sdk_key(make_token(alice, acme, scopes=["tinker"]))
    proc = tinker_live.start_model_server(platform)
    try:
        service = tinker.ServiceClient(base_url=f"{platform}/tinker", api_key=key)
        trainer = service.create_lora_training_client(base_model=BASE_MODEL, rank=4, seed=0).result(
            timeout=WAIT
        )
        trainer.forward_backward(DATA, "cross_entropy").result(timeout=WAIT)
        trainer.optim_step(types.AdamParams(learning_rate=1e-2)).result(timeout=WAIT)
        saved = trainer.save_state("before-restart").result(timeout=WAIT)
        at_save = trainer.forward(DATA, "cross_entropy").result(timeout=WAIT).metrics["loss:sum"]
        weights = trainer.save_weights_for_sampler("s").result(timeout=WAIT).path
        sampler = service.create_sampling_client(model_path=weights).result(timeout=WAIT)
        prompt = types.ModelInput.from_ints(TOKENS[:5])
        params = types.SamplingParams(max_tokens=4, temperature=1.0, seed=7, stop=[])
        before = sampler.sample(prompt=prompt, num_samples=2, sampling_params=params).result(timeout=WAIT)

        # A call the server takes and cannot finish yet: seq_id 2 of a model whose seq_id 1 never comes.
        session = post(platform, key, "create_session", {"tags": []}).json()["session_id"]
        create = {
            "session_id": session,
            "model_seq_id": 0,
            "base_model": BASE_MODEL,
            "lora_config": {"rank": 4},
        }
        created = post(platform, key, "create_model", create).json()
        stuck_model = settled(platform, key, created["request_id"])["model_id"]
        optim = {"model_id": stuck_model, "seq_id": 2, "adam_params": {"learning_rate": 1e-3}}
        stuck = post(platform, key, "optim_step", optim).json()["request_id"]
        # The queue is FIFO: once a later call is answered, the server has claimed the stuck one.
        sampler.sample(prompt=prompt, num_samples=1, sampling_params=params).result(timeout=WAIT)
        claimed = queue.client().lrange(queue.claimed_key(BASE_MODEL), 0, -1)
        assert any(stuck.encode() in raw for raw in claimed)

        proc.kill()  # SIGKILL: nothing runs on the way out
        proc.wait(WAIT)
        tinker_live.lease_lapses()  # its one-server lease outlives it by its TTL: played out here
        lost_next = trainer.forward(DATA, "cross_entropy")  # sent while no server runs: it waits in the queue
        proc = tinker_live.start_model_server(platform)

        # The in-flight call fails clearly; it is not pending, nor silently re-run.
        failed = settled(platform, key, stuck)
        assert failed["category"] == "server" and "restarted while this call was in flight" in failed["error"]
        assert TinkerFuture.objects.get(pk=stuck).state == "failed"
        # The training client the dead server held: its next call fails clearly, naming the way out.
        with pytest.raises(tinker.RequestFailedError, match="not on this model server") as lost:
            lost_next.result(timeout=WAIT)
        assert lost.value.category == "server"
        assert not any(
            stuck.encode() in r for r in queue.client().lrange(queue.claimed_key(BASE_MODEL), 0, -1)
        )

        # Acknowledged work: a finished future still answers (protobuf), the saved state resumes with the same
        # loss and trains on, the sampling client on saved weights samples the same tokens for the same seed.
        done = TinkerFuture.objects.get(model_id=trainer.model_id, operation="forward_backward", seq_id=1)
        reply = post(platform, key, "retrieve_future", {"request_id": str(done.pk)})
        assert reply.status_code == 200 and reply.headers["content-type"] == "application/x-protobuf"
        resumed = service.create_training_client_from_state_with_optimizer(saved.path).result(timeout=WAIT)
        assert resumed.forward(DATA, "cross_entropy").result(timeout=WAIT).metrics[
            "loss:sum"
        ] == pytest.approx(at_save, rel=1e-5)
        resumed.forward_backward(DATA, "cross_entropy").result(timeout=WAIT)
        assert resumed.optim_step(types.AdamParams(learning_rate=1e-2)).result(timeout=WAIT).metrics
        after = sampler.sample(prompt=prompt, num_samples=2, sampling_params=params).result(timeout=WAIT)
        assert [s.tokens for s in after.sequences] == [s.tokens for s in before.sequences]
        service.close("success").result(timeout=WAIT)
    finally:
        tinker_live.stop(proc)
