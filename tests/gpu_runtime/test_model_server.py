"""The model server's engine core (gpu_runtime/model_server): multi-LoRA forward_backward batched across
adapters in one pass, AdamW per adapter, save/load and PEFT compatibility, eviction, seq_id ordering and
retries, bad input. CPU, tiny-qwen2 in fp32, a few tokens per datum."""

from __future__ import annotations

import math

import pytest
import torch
from peft import PeftModel

from gpu_runtime.model_server import (
    AdamParams,
    ComputeLogprobs,
    Datum,
    ForwardBackward,
    ForwardBackwardResult,
    LoadState,
    LoraConfig,
    ModelServer,
    ModelServerError,
    OptimStep,
    OptimStepResult,
    Sample,
    SampleResult,
    SamplingParams,
    SaveState,
)
from gpu_runtime.model_server.logprobs import token_logprobs
from gpu_runtime.models import load_model

TOL = dict(rtol=1e-4, atol=1e-5)
ADAM = AdamParams(learning_rate=1e-2)
# Three clients with different ranks and module sets.
CONFIGS = {
    "a": LoraConfig(rank=4, seed=1),
    "b": LoraConfig(rank=8, seed=2, train_unembed=False),
    "c": LoraConfig(rank=2, seed=3, train_mlp=False, train_attn=True, train_unembed=False),
}


def _ce(tokens: list[int], weights: list[float] | None = None) -> Datum:
    """A cross-entropy datum predicting tokens[1:] from tokens[:-1]."""
    w = weights if weights is not None else [1.0] * (len(tokens) - 1)
    return Datum(tokens[:-1], {"target_tokens": tokens[1:], "weights": w})


def _rl(tokens: list[int], old: list[float], adv: list[float]) -> Datum:
    return Datum(tokens[:-1], {"target_tokens": tokens[1:], "logprobs": old, "advantages": adv})


def _server(**kw) -> ModelServer:
    s = ModelServer("tiny-qwen2", **kw)
    for mid, cfg in CONFIGS.items():
        s.create_model(mid, cfg)
    return s


def _warm_up(s: ModelServer) -> None:
    """One step per adapter on its own data, so B != 0 and every adapter changes the model differently."""
    for i, mid in enumerate(CONFIGS):
        s.call(mid, 1, ForwardBackward([_ce([10 + i, 20, 30 + i, 40, 50])], "cross_entropy"))
        s.call(mid, 2, OptimStep(ADAM))


def _grads(s: ModelServer, mid: str) -> dict[str, torch.Tensor]:
    adapter = s.models[mid].adapter
    assert adapter is not None
    return {k: p.grad.clone() for k, p in adapter.named_parameters().items() if p.grad is not None}


def _next(s: ModelServer, mid: str) -> int:
    return s.models[mid].queue.next_seq_id


def _fb(s: ModelServer, mid: str, seq: int, op: ForwardBackward) -> ForwardBackwardResult:
    r = s.call(mid, seq, op)
    assert isinstance(r, ForwardBackwardResult)
    return r


# ---- one pass across adapters ----

CALLS = {  # rows of different lengths and losses per client
    "a": ForwardBackward([_ce([1, 2, 3, 4, 5, 6]), _ce([7, 8, 9], [1.0, -0.5])], "cross_entropy"),
    "b": ForwardBackward([_rl([5, 6, 7, 8], [-5.0, -5.5, -6.0], [1.0, -1.0, 0.5])], "ppo"),
    "c": ForwardBackward([_rl([9, 10, 11, 12, 13], [-5.0] * 4, [1.0, 1.0, -2.0, 0.0])], "cispo"),
}


def test_batched_forward_backward_across_adapters_equals_each_adapter_alone():
    batched, alone = _server(), _server()
    _warm_up(batched)
    _warm_up(alone)
    passes = []
    batched.host.model.register_forward_hook(lambda *_: passes.append(1))
    for mid, op in CALLS.items():
        assert batched.submit(mid, 3, op) is None
    outcomes = batched.step()
    assert len(passes) == 1, "the three clients' calls must share one forward pass"
    assert [(o.model_id, o.seq_id) for o in outcomes] == [("a", 3), ("b", 3), ("c", 3)]
    for o in outcomes:
        ref = _fb(alone, o.model_id, 3, CALLS[o.model_id])
        got = o.unwrap()
        assert isinstance(got, ForwardBackwardResult)
        assert got.metrics["loss:sum"] == pytest.approx(ref.metrics["loss:sum"], rel=1e-4, abs=1e-5)
        for g, r in zip(got.loss_fn_outputs, ref.loss_fn_outputs, strict=True):
            torch.testing.assert_close(g["logprobs"], r["logprobs"], **TOL)
            torch.testing.assert_close(g["elementwise_loss"], r["elementwise_loss"], **TOL)
        got_g, ref_g = _grads(batched, o.model_id), _grads(alone, o.model_id)
        assert got_g.keys() == ref_g.keys() and got_g
        assert any(g.abs().max() > 1e-6 for g in got_g.values())
        for k in ref_g:
            # Batched and alone sum in different orders: an element near zero may differ by ~1e-6 (seen on
            # Intel Xeon with AVX-512), so the bound follows the tensor's scale; a mixed-up adapter or row
            # would be off by the gradients' own size.
            scale = float(ref_g[k].abs().max())
            torch.testing.assert_close(got_g[k], ref_g[k], rtol=1e-4, atol=max(1e-6, 1e-4 * scale))


def test_rows_in_any_order_and_rows_without_adapter_are_routed_right():
    """Interleaved rows (gathered by index), contiguous runs (slices) and base rows give each row what its
    adapter alone gives."""
    s = _server()
    _warm_up(s)
    a, b = s.models["a"].adapter, s.models["b"].adapter
    rows = [[1, 2, 3, 4, 5], [6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16, 17, 18]]
    targets = [torch.tensor([*r[1:], 0]) for r in rows]
    owners = [a, b, a, None]
    alone = [token_logprobs(s.host, [r], [t], [o])[0] for r, t, o in zip(rows, targets, owners, strict=True)]
    # a, b, a, None: gathered by index; a, a, b, None and None, b, a, a: contiguous runs
    for order in ([0, 1, 2, 3], [0, 2, 1, 3], [3, 1, 0, 2]):
        got = token_logprobs(
            s.host, [rows[i] for i in order], [targets[i] for i in order], [owners[i] for i in order]
        )
        for i, lp in zip(order, got, strict=True):
            torch.testing.assert_close(lp, alone[i], **TOL)


def test_logprobs_one_per_input_token_and_cross_entropy_is_their_weighted_sum():
    s = ModelServer("tiny-qwen2")
    s.create_model("a", LoraConfig(rank=4))  # fresh: B = 0, so exactly the base model
    tokens, weights = [3, 1, 4, 1, 5, 9], [0.0, 1.0, 2.0, -1.0, 0.5]
    r = _fb(s, "a", 1, ForwardBackward([_ce(tokens, weights)], "cross_entropy", forward_only=True))
    base = load_model("tiny-qwen2").model.eval()
    with torch.no_grad():
        ref = torch.log_softmax(base(torch.tensor([tokens[:-1]])).logits[0].float(), -1)
    expected = ref[torch.arange(5), torch.tensor(tokens[1:])]
    torch.testing.assert_close(r.loss_fn_outputs[0]["logprobs"], expected, **TOL)
    assert r.metrics["loss:sum"] == pytest.approx(-(torch.tensor(weights) * expected).sum().item(), rel=1e-5)


def test_forward_does_not_accumulate_and_forward_backward_does_until_optim_step():
    s = _server()
    op = CALLS["a"]
    _fb(s, "a", 1, ForwardBackward(op.data, op.loss_fn, forward_only=True))
    assert _grads(s, "a") == {}
    _fb(s, "a", 2, op)
    once = _grads(s, "a")
    _fb(s, "a", 3, op)
    for k, g in _grads(s, "a").items():
        torch.testing.assert_close(g, 2 * once[k], rtol=1e-5, atol=1e-7)
    r = s.call("a", 4, OptimStep(ADAM))
    assert isinstance(r, OptimStepResult) and r.metrics["grad_norm:mean"] > 0
    assert _grads(s, "a") == {}


# ---- optimizer ----


def _step_metrics(adam: AdamParams) -> tuple[float, dict[str, torch.Tensor]]:
    s = ModelServer("tiny-qwen2")
    s.create_model("a", LoraConfig(rank=4, seed=1))
    _fb(s, "a", 1, CALLS["a"])
    r = s.call("a", 2, OptimStep(adam))
    assert isinstance(r, OptimStepResult)
    adapter = s.models["a"].adapter
    assert adapter is not None
    return r.metrics["grad_norm:mean"], {k: p.detach().clone() for k, p in adapter.named_parameters().items()}


def test_optim_step_is_adam_with_the_calls_parameters():
    norm, plain = _step_metrics(AdamParams(learning_rate=1e-3))
    init = ModelServer("tiny-qwen2").host.new_adapter(LoraConfig(rank=4, seed=1)).named_parameters()
    key = next(k for k in plain if k.endswith("lora_B.weight"))
    # Adam's first step moves each parameter with a gradient by lr * sign(g) (m/sqrt(v) = g/|g|)
    moved = (plain[key] - init[key].detach()).abs()
    assert moved.max().item() == pytest.approx(1e-3, rel=1e-3)
    a_key = key.replace("lora_B", "lora_A")
    torch.testing.assert_close(plain[a_key], init[a_key].detach())  # B was 0: no gradient reached A
    # weight decay (decoupled): A shrinks by lr * wd
    _, decayed = _step_metrics(AdamParams(learning_rate=1e-3, weight_decay=10.0))
    torch.testing.assert_close(decayed[a_key], init[a_key].detach() * (1 - 1e-3 * 10.0))
    # clipping reports the unclipped norm and does not change Adam's first (scale-free) step
    clipped_norm, clipped = _step_metrics(AdamParams(learning_rate=1e-3, grad_clip_norm=norm / 10))
    assert clipped_norm == pytest.approx(norm, rel=1e-5)
    torch.testing.assert_close(clipped[key], plain[key], rtol=1e-3, atol=1e-6)


def test_a_supervised_loop_on_one_adapter_lowers_the_loss():
    s = _server()
    data = [_ce(list(b"12+7=19\n")), _ce(list(b"3+4=7\n"))]
    losses = []
    for step in range(25):
        r = _fb(s, "b", 2 * step + 1, ForwardBackward(data, "cross_entropy"))
        losses.append(r.metrics["loss:sum"])
        s.call("b", 2 * step + 2, OptimStep(AdamParams(learning_rate=5e-3)))
    assert losses[-1] < 0.3 * losses[0], losses
    # the other clients' adapters did not move: their loss on the same data is the base model's
    base = _fb(s, "a", 1, ForwardBackward(data, "cross_entropy", forward_only=True))
    assert base.metrics["loss:sum"] == pytest.approx(losses[0], rel=1e-4)


# ---- state on storage ----


def _train(s: ModelServer, mid: str, first_seq: int, steps: int) -> list[float]:
    losses = []
    for i in range(steps):
        data = [_ce([1 + i, 2, 3, 4 + i, 5, 6]), _ce([9, 8, 7 + i, 6])]
        losses.append(
            _fb(s, mid, first_seq + 2 * i, ForwardBackward(data, "cross_entropy")).metrics["loss:sum"]
        )
        s.call(mid, first_seq + 2 * i + 1, OptimStep(ADAM))
    return losses


def test_save_state_then_load_state_resumes_with_the_same_next_losses(tmp_path):
    s = _server()
    _train(s, "a", 1, 3)
    uri = f"file://{tmp_path}/weights/step3"
    s.call("a", 7, SaveState(uri))
    assert (tmp_path / "weights/step3/optimizer.safetensors").is_file()
    uninterrupted = _train(s, "a", 8, 2)

    other = ModelServer("tiny-qwen2")
    other.create_model_from_state("resumed", uri, optimizer=True)
    assert other.info("resumed").lora_rank == 4
    resumed = _train(other, "resumed", 1, 2)
    assert resumed == pytest.approx(uninterrupted, rel=1e-5, abs=1e-6)
    # without the optimizer state the weights are the same (same first loss) but the next step differs
    other.create_model_from_state("fresh_adam", uri, optimizer=False)
    fresh = _train(other, "fresh_adam", 1, 2)
    assert fresh[0] == pytest.approx(uninterrupted[0], rel=1e-5)
    assert abs(fresh[1] - uninterrupted[1]) > 1e-3
    # load_state into an existing client replaces its adapter
    s.call("b", 1, LoadState(uri))
    again = _train(s, "b", 2, 2)
    assert again == pytest.approx(uninterrupted, rel=1e-5, abs=1e-6)


def test_saved_for_sampler_is_a_peft_adapter_that_peft_loads_onto_the_base(tmp_path):
    s = _server()
    _warm_up(s)
    prompt = [257, 10, 20, 30, 40]
    for mid in CONFIGS:
        uri = f"file://{tmp_path}/sampler_weights/{mid}"
        s.call(mid, 3, SaveState(uri, for_sampler=True))
        assert not (tmp_path / f"sampler_weights/{mid}/optimizer.safetensors").exists()
        ours = s.call(mid, 4, ComputeLogprobs(prompt))
        peft = PeftModel.from_pretrained(
            load_model("tiny-qwen2").model, str(tmp_path / f"sampler_weights/{mid}")
        )
        with torch.no_grad():
            logits = peft.eval()(torch.tensor([prompt])).logits[0].float()
        expected = torch.log_softmax(logits, -1)[torch.arange(4), torch.tensor(prompt[1:])]
        assert math.isnan(ours.logprobs[0])
        torch.testing.assert_close(torch.tensor(ours.logprobs[1:]), expected, **TOL)
        # ...and a sampling client made from that path computes the same
        s.create_sampler(f"sampler-{mid}", uri)
        from_path = s.call(f"sampler-{mid}", 1, ComputeLogprobs(prompt))
        torch.testing.assert_close(torch.tensor(from_path.logprobs[1:]), expected, **TOL)


def test_evicted_adapters_come_back_with_their_adam_state_and_pending_gradients(tmp_path):
    kept = _server()
    tight = _server(spill_uri=f"file://{tmp_path}/spill", max_resident=1)
    assert len(tight.resident()) == 1
    for s in (kept, tight):  # interleaved clients: with one resident adapter each call reloads its own
        for step in range(3):
            for i, mid in enumerate(CONFIGS):
                s.submit(mid, 2 * step + 1, ForwardBackward([_ce([1, 2 + i, 3 + step, 4])], "cross_entropy"))
            s.run_until_idle()
            for mid in CONFIGS:
                s.call(mid, 2 * step + 2, OptimStep(ADAM))
    tight.evict("a")  # with pending gradients
    kept_r = _fb(kept, "a", 7, CALLS["a"])
    _fb(kept, "a", 8, CALLS["a"])
    assert tight.submit("a", 7, CALLS["a"]) is None
    tight.run_until_idle()
    tight.evict("a")
    tight_r = _fb(tight, "a", 8, CALLS["a"])
    assert tight_r.metrics["loss:sum"] == pytest.approx(kept_r.metrics["loss:sum"], rel=1e-5)
    assert tight.resident() == ["a"]
    for k, g in _grads(kept, "a").items():
        torch.testing.assert_close(_grads(tight, "a")[k], g, rtol=1e-5, atol=1e-7)
    for mid in CONFIGS:
        seq = 9 if mid == "a" else 7
        k_lp = kept.call(mid, seq, ComputeLogprobs([5, 6, 7, 8]))
        t_lp = tight.call(mid, seq, ComputeLogprobs([5, 6, 7, 8]))
        torch.testing.assert_close(torch.tensor(t_lp.logprobs[1:]), torch.tensor(k_lp.logprobs[1:]), **TOL)


# ---- ordering and retries ----


def test_calls_run_in_seq_id_order_whatever_order_they_arrive_in():
    s, ref = _server(), _server()
    fwd = ForwardBackward(CALLS["a"].data, "cross_entropy", forward_only=True)
    expected = [_fb(ref, "a", 1, CALLS["a"]), ref.call("a", 2, OptimStep(ADAM)), _fb(ref, "a", 3, fwd)]
    assert s.submit("a", 3, fwd) is None
    assert s.submit("a", 2, OptimStep(ADAM)) is None
    assert s.step() == []  # seq 1 has not arrived: nothing of "a" may run
    assert s.submit("a", 1, CALLS["a"]) is None
    done = s.run_until_idle()
    assert [o.seq_id for o in done] == [1, 2, 3]
    r3 = done[2].unwrap()
    assert isinstance(r3, ForwardBackwardResult) and isinstance(expected[2], ForwardBackwardResult)
    # the forward at seq 3 saw the weights after seq 2's step
    assert r3.metrics["loss:sum"] == pytest.approx(expected[2].metrics["loss:sum"], rel=1e-5)
    r1 = done[0].unwrap()
    assert isinstance(r1, ForwardBackwardResult) and r3.metrics["loss:sum"] < r1.metrics["loss:sum"]


def test_a_retried_seq_id_is_the_same_call_never_run_twice():
    s, ref = _server(), _server()
    first = _fb(s, "a", 1, CALLS["a"])
    again = s.submit("a", 1, CALLS["a"])  # a retry after completion: the kept outcome
    assert again is not None and again.unwrap() is first
    assert s.call("a", 1, CALLS["a"]) is first
    assert s.submit("a", 2, OptimStep(ADAM)) is None
    assert s.submit("a", 2, OptimStep(ADAM)) is None  # a retry while queued is absorbed
    (only,) = s.run_until_idle()
    _fb(ref, "a", 1, CALLS["a"])
    r = ref.call("a", 2, OptimStep(ADAM))
    assert isinstance(r, OptimStepResult)
    # gradients accumulated once, not twice
    stepped = only.unwrap()
    assert isinstance(stepped, OptimStepResult)
    assert stepped.metrics["grad_norm:mean"] == pytest.approx(r.metrics["grad_norm:mean"], rel=1e-5)
    with pytest.raises(ModelServerError, match="seq_id 1 was already used for a different call"):
        s.submit("a", 1, CALLS["b"])


# ---- bad input ----


def _raw(model_input: list[int], **inputs: list) -> ForwardBackward:
    return ForwardBackward([Datum(model_input, inputs)], "cross_entropy")


def test_bad_input_fails_that_call_clearly_and_the_client_goes_on():
    s = _server()
    with pytest.raises(ModelServerError, match="unknown model 'nobody'") as e:
        s.submit("nobody", 1, CALLS["a"])
    assert e.value.category == "user"
    bad = [
        (ForwardBackward(CALLS["a"].data, "dpo"), "unknown loss_fn 'dpo'"),
        (
            _raw([1, 2, 3], target_tokens=[2, 3], weights=[1, 1]),
            r"\['target_tokens'\] has shape \(2,\), expected \(3,\)",
        ),
        (_raw([1, 2], target_tokens=[[2, 3]], weights=[1, 1]), r"has shape \(1, 2\)"),
        (_raw([1, 2], target_tokens=[2, 3]), r"missing \['weights'\]"),
        (_raw([1, 2], target_tokens=[2, 3], weights=[1, 1], mask=[1, 1]), r"unexpected \['mask'\]"),
        (_raw([1, 99999], target_tokens=[2, 3], weights=[1, 1]), "model_input token ids must be in"),
        (_raw([1, 2], target_tokens=[2.5, 3.0], weights=[1, 1]), "target_tokens must be integers"),
        (ForwardBackward([], "cross_entropy"), "at least one datum"),
        (OptimStep(AdamParams(learning_rate=-1.0)), "learning_rate >= 0"),
        (Sample([1, 2], 1, SamplingParams(max_tokens=2, top_k=-2)), r"top_k must be -1 \(off\) or >= 1"),
        (LoadState("file:///nonexistent/state"), "no saved adapter"),
    ]
    for seq, (op, message) in enumerate(bad, start=1):
        with pytest.raises(ModelServerError, match=message) as e:
            s.call("a", seq, op)
        assert e.value.category == "user"
    # a bad call in a batch fails alone: the others in the same pass succeed
    s.submit("a", len(bad) + 1, ForwardBackward(CALLS["a"].data, "dpo"))
    s.submit("b", 1, CALLS["b"])
    bad_o, good_o = s.step()
    assert bad_o.error is not None and good_o.error is None
    s.create_sampler("base")
    with pytest.raises(ModelServerError, match="is a sampler"):
        s.call("base", 1, CALLS["a"])
    with pytest.raises(ModelServerError, match="already exists"):
        s.create_model("a", LoraConfig())
    with pytest.raises(ModelServerError, match="rank must be in"):
        s.create_model("z", LoraConfig(rank=0))


# ---- sampling ----


def test_sampling_stops_inclusively_is_seeded_and_reports_logprobs_of_the_sampled_tokens():
    s = _server()
    _warm_up(s)
    prompt = [257, 10, 20, 30]
    greedy = s.call("a", 3, Sample(prompt, 1, SamplingParams(max_tokens=6, temperature=0, stop=[])))
    assert isinstance(greedy, SampleResult)
    ids = greedy.sequences[0].tokens
    assert len(ids) == 6 and greedy.sequences[0].stop_reason == "length"
    cut = ids.index(ids[2]) + 1
    stopped = s.call("a", 4, Sample(prompt, 1, SamplingParams(max_tokens=6, temperature=0, stop=[ids[2]])))
    assert isinstance(stopped, SampleResult)
    assert stopped.sequences[0].tokens == ids[:cut] and stopped.sequences[0].stop_reason == "stop"
    text = s.tokenizer.decode(ids[:cut])
    by_text = s.call("a", 5, Sample(prompt, 1, SamplingParams(max_tokens=6, temperature=0, stop=[text[-1]])))
    assert isinstance(by_text, SampleResult)
    assert s.tokenizer.decode(by_text.sequences[0].tokens).endswith(text[-1])
    assert by_text.sequences[0].stop_reason == "stop"

    params = SamplingParams(max_tokens=5, seed=7, stop=[])
    one = s.call("a", 6, Sample(prompt, 3, params, prompt_logprobs=True))
    two = s.call("a", 7, Sample(prompt, 3, params))
    assert isinstance(one, SampleResult) and isinstance(two, SampleResult)
    assert [q.tokens for q in one.sequences] == [q.tokens for q in two.sequences]
    for q in one.sequences:  # the sampler's log-probs are the adapter's (temperature 1)
        full = s.call("a", _next(s, "a"), ComputeLogprobs(prompt + q.tokens))
        torch.testing.assert_close(
            torch.tensor(q.logprobs), torch.tensor(full.logprobs[len(prompt) :]), **TOL
        )
    assert one.prompt_logprobs is not None and math.isnan(one.prompt_logprobs[0])
    # the base model samples differently from the trained adapter (same seed)
    s.create_sampler("base")
    base = s.call("base", 1, ComputeLogprobs(prompt))
    adapted = s.call("a", _next(s, "a"), ComputeLogprobs(prompt))
    assert not torch.allclose(torch.tensor(base.logprobs[1:]), torch.tensor(adapted.logprobs[1:]), **TOL)


def test_state_and_spilled_adapters_on_s3(s3_store, monkeypatch):
    """The same through a real S3 API (moto's server), as a model server on a pool would store them."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_store.endpoint)
    s = _server(spill_uri="s3://otk-store/spill")
    _warm_up(s)
    s.call("a", 3, SaveState("s3://otk-store/runs/r1/weights/w"))
    keys = {o["Key"] for o in s3_store.client.list_objects_v2(Bucket="otk-store")["Contents"]}
    assert {"runs/r1/weights/w/adapter_model.safetensors", "runs/r1/weights/w/meta.json"} <= keys
    before = s.call("a", 4, ComputeLogprobs([5, 6, 7, 8]))
    s.evict("a")
    after = s.call("a", 5, ComputeLogprobs([5, 6, 7, 8]))
    s.create_model_from_state("resumed", "s3://otk-store/runs/r1/weights/w", optimizer=True)
    resumed = s.call("resumed", 1, ComputeLogprobs([5, 6, 7, 8]))
    for r in (after, resumed):
        torch.testing.assert_close(torch.tensor(r.logprobs[1:]), torch.tensor(before.logprobs[1:]), **TOL)
