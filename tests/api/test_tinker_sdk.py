"""The official `tinker` SDK (0.38.0 from PyPI, unpatched) against the live platform: the ASGI app on a
loopback port, a model server process (`python -m gpu_runtime.model_server serve`) on the same Valkey, a
supervised loop on tiny-qwen2 whose loss falls, sampling, and tenancy.

Actors: alice (owner of acme), bob (member of acme), charlie (outsider, owner of globex)."""

from __future__ import annotations

import httpx
import pytest
import tinker
from tinker import types

from api.tinker.auth import sdk_key
from api.tinker.models import TinkerFuture, TinkerModel, TinkerSession
from api.tinker.proto import tinker_public_pb2 as pb
from api.tinker.server_tokens import model_server_token_issue
from tests.api import tinker_live
from tests.api.tinker_live import BASE_MODEL, WAIT, datum, post, settled

pytestmark = pytest.mark.django_db(transaction=True)
platform, model_server = tinker_live.platform, tinker_live.model_server
SCOPES = ["tinker"]
LR = 5e-3  # 8 steps take the loss from 268 to 100 (tiny-qwen2, seed 0); the bar below is 0.5x


def sequence() -> list[int]:
    return [ord(c) % 200 + 3 for c in "the cat sat on the mat. the cat sat on the mat."]


def test_sdk_supervised_loop_sampling_and_tenancy(
    platform, model_server, alice, bob, charlie, acme, globex, make_token
):
    alice_key = sdk_key(make_token(alice, acme, scopes=SCOPES))
    bob_key = sdk_key(make_token(bob, acme, scopes=SCOPES))
    charlie_key = sdk_key(make_token(charlie, globex, scopes=SCOPES))
    service = tinker.ServiceClient(base_url=f"{platform}/tinker", api_key=alice_key)
    trainer = service.create_lora_training_client(base_model=BASE_MODEL, rank=8, seed=0).result(timeout=WAIT)
    data = [datum(sequence())]

    losses = []
    for _ in range(8):
        fb = trainer.forward_backward(data, "cross_entropy")
        opt = trainer.optim_step(types.AdamParams(learning_rate=LR))
        losses.append(fb.result(timeout=WAIT).metrics["loss:sum"])
        assert opt.result(timeout=WAIT).metrics["learning_rate:mean"] == pytest.approx(LR)
    evaluation = trainer.forward(data, "cross_entropy").result(timeout=WAIT)
    final = evaluation.metrics["loss:sum"]
    assert final < 0.5 * losses[0], (losses, final)
    (out,) = evaluation.loss_fn_outputs
    logprobs = out["logprobs"].to_numpy()
    assert logprobs.shape == (len(sequence()) - 1,)
    assert -logprobs.sum() == pytest.approx(final, rel=1e-4)  # cross_entropy is a sum over tokens

    # save_state, then a new training client from it: the same weights, the same loss.
    saved = trainer.save_state("after-eight").result(timeout=WAIT)
    assert saved.path == f"tinker://{trainer.model_id}/weights/after-eight"
    resumed = service.create_training_client_from_state_with_optimizer(saved.path).result(timeout=WAIT)
    assert resumed.forward(data, "cross_entropy").result(timeout=WAIT).metrics["loss:sum"] == pytest.approx(
        final, rel=1e-5
    )

    sampler = trainer.save_weights_and_get_sampling_client().result(timeout=WAIT)
    prompt = types.ModelInput.from_ints(sequence()[:10])
    params = types.SamplingParams(max_tokens=6, temperature=1.0, seed=1, stop=[])
    samples = sampler.sample(prompt=prompt, num_samples=2, sampling_params=params).result(timeout=WAIT)
    assert [len(s.tokens) for s in samples.sequences] == [6, 6]
    assert all(s.stop_reason == "length" and len(s.logprobs) == 6 for s in samples.sequences)
    # The sampler holds the trained weights: its prompt log-probs are the training client's (NaN/None first).
    scored = sampler.compute_logprobs(types.ModelInput.from_ints(sequence())).result(timeout=WAIT)
    assert scored[0] is None or scored[0] != scored[0]
    assert scored[1:] == pytest.approx(logprobs.tolist(), abs=1e-4)

    # importance_sampling with the current weights' own log-probs: every ratio is 1, the loss -sum(A).
    rl = types.Datum(
        model_input=types.ModelInput.from_ints(sequence()[:-1]),
        loss_fn_inputs={
            "target_tokens": sequence()[1:],
            "logprobs": logprobs.tolist(),
            "advantages": [0.5] * len(logprobs),
        },
    )
    is_loss = trainer.forward([rl], "importance_sampling").result(timeout=WAIT).metrics["loss:sum"]
    assert is_loss == pytest.approx(-0.5 * len(logprobs), rel=1e-4)

    # Tenancy: every object belongs to acme. bob (same organization) sees the model; charlie gets 404s.
    model_id = trainer.model_id
    assert post(platform, bob_key, "get_info", {"model_id": model_id}).json()["model_id"] == model_id
    assert post(platform, charlie_key, "get_info", {"model_id": model_id}).status_code == 404
    done = TinkerFuture.objects.filter(model_id=model_id, operation="forward_backward").first()
    assert post(platform, charlie_key, "retrieve_future", {"request_id": str(done.pk)}).status_code == 404
    fb_reply = post(platform, bob_key, "retrieve_future", {"request_id": str(done.pk)})
    assert fb_reply.headers["content-type"] == "application/x-protobuf"
    optim = {"model_id": model_id, "seq_id": 1000, "adam_params": {"learning_rate": 1e-3}}
    assert post(platform, charlie_key, "optim_step", optim).status_code == 404
    charlies = post(platform, charlie_key, "create_session", {"tags": []}).json()["session_id"]
    load = {"session_id": charlies, "model_seq_id": 0, "path": saved.path, "optimizer": True}
    assert post(platform, charlie_key, "load_weights", load).status_code == 404

    # charlie's own training client: his, invisible to alice.
    other = tinker.ServiceClient(base_url=f"{platform}/tinker", api_key=charlie_key)
    theirs = other.create_lora_training_client(base_model=BASE_MODEL, rank=4).result(timeout=WAIT)
    assert TinkerModel.objects.get(pk=theirs.model_id).organization == globex
    assert post(platform, alice_key, "get_info", {"model_id": theirs.model_id}).status_code == 404
    assert theirs.forward(data, "cross_entropy").result(timeout=WAIT).metrics["loss:sum"] > 0
    # A call the model server refuses fails in the SDK with the user's category, and the client goes on.
    n = len(sequence()) - 1
    out_of_vocab = types.Datum(
        model_input=types.ModelInput.from_ints(sequence()[:-1]),
        loss_fn_inputs={"target_tokens": [10**6] * n, "weights": [1.0] * n},
    )
    with pytest.raises(tinker.RequestFailedError, match="target_tokens") as failed:
        theirs.forward([out_of_vocab], "cross_entropy").result(timeout=WAIT)
    assert failed.value.category == "user"
    assert theirs.forward(data, "cross_entropy").result(timeout=WAIT).metrics["loss:sum"] > 0

    # A retried call (same model, same seq_id) is the same call.
    nxt = (
        TinkerFuture.objects.filter(model_id=model_id).exclude(seq_id=None).order_by("-seq_id")[0].seq_id + 1
    )
    optim = {"model_id": model_id, "seq_id": nxt, "adam_params": {"learning_rate": 1e-3}}
    first, again = (post(platform, alice_key, "optim_step", optim).json() for _ in range(2))
    assert first["request_id"] == again["request_id"]
    assert TinkerFuture.objects.filter(model_id=model_id, seq_id=nxt).count() == 1

    # A forward_backward the API cannot decode (an image chunk) is refused, yet takes its turn: the next runs.
    bad = pb.ForwardBackwardRequest(model_id=model_id, seq_id=nxt + 1, loss_fn="cross_entropy")
    bad.data.add().model_input.add().image.data = b"png"
    refused = httpx.post(
        f"{platform}/tinker/api/v1/forward_backward",
        content=bad.SerializeToString(),
        headers={"X-API-Key": alice_key, "Content-Type": "application/x-protobuf"},
    )
    assert refused.status_code == 400 and "encoded_text" in refused.json()["error"]
    optim["seq_id"] = nxt + 2
    after = post(platform, alice_key, "optim_step", optim).json()["request_id"]
    assert settled(platform, alice_key, after)["metrics"]["learning_rate:mean"] == pytest.approx(1e-3)
    assert TinkerFuture.objects.get(model_id=model_id, seq_id=nxt + 1).state == "failed"

    service.close("success").result(timeout=WAIT)
    assert TinkerSession.objects.get(models__pk=model_id).finish_reason == "success"
    other.close("success").result(timeout=WAIT)


def test_keys_and_ingest_tokens(platform, alice, acme, make_token):
    token = make_token(alice, acme, scopes=SCOPES)
    without_scope = sdk_key(make_token(alice, acme, scopes=["jobs:read", "jobs:write"]))
    assert post(platform, without_scope, "create_session", {"tags": []}).status_code == 403
    assert post(platform, token, "create_session", {"tags": []}).status_code == 401  # no tml- prefix
    assert post(platform, "tml-otk_000000000000_" + "x" * 43, "create_session", {}).status_code == 401
    created = post(platform, sdk_key(token), "create_session", {"tags": [], "sdk_version": "0.38.0"})
    assert created.status_code == 200 and created.json()["type"] == "create_session"

    ingest = f"{platform}/tinker/ingest/outcomes"
    body = {"outcomes": []}
    assert httpx.post(ingest, json=body, headers={"Authorization": f"Bearer {token}"}).status_code == 401
    assert httpx.post(ingest, json=body, headers={"Authorization": "Bearer otm_x.1.y"}).status_code == 401
    # A model server may complete only futures of its own base model.
    session = created.json()["session_id"]
    future = post(
        platform,
        sdk_key(token),
        "create_model",
        {"session_id": session, "model_seq_id": 0, "base_model": BASE_MODEL, "lora_config": {"rank": 4}},
    ).json()["request_id"]
    elsewhere = model_server_token_issue("qwen2.5-0.5b-shape")
    outcome = {"outcomes": [{"future": future, "result": {}}]}
    answer = httpx.post(ingest, json=outcome, headers={"Authorization": f"Bearer {elsewhere}"})
    assert answer.json() == {"written": 0, "unknown": 1}
    assert TinkerFuture.objects.get(pk=future).state == "pending"
    unknown = post(
        platform,
        sdk_key(token),
        "create_model",
        {"session_id": session, "model_seq_id": 1, "base_model": "no-such-model"},
    )
    assert unknown.status_code == 400 and "no-such-model" in unknown.json()["error"]
    # A finished session: its heartbeat gets 410 (the SDK stops it), nothing more runs in it.
    assert post(
        platform, sdk_key(token), f"sessions/{session}/finish", {"reason": {"type": "success"}}
    ).is_success
    assert post(platform, sdk_key(token), "session_heartbeat", {"session_id": session}).status_code == 410
    again = {"session_id": session, "model_seq_id": 2, "base_model": BASE_MODEL}
    assert post(platform, sdk_key(token), "create_model", again).status_code == 400
