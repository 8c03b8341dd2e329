"""Sampling on the model server (gpu_runtime/model_server/sampling.py): sample calls of several adapters (and
the base) decode together in one batched loop with per-row adapter routing and give what each call gives
alone; top_k. CPU, tiny-qwen2 in fp32, a few tokens."""

from __future__ import annotations

import torch

from gpu_runtime.model_server import ModelServer, Sample, SampleResult, SamplingParams
from gpu_runtime.model_server.sampling import _choose_rows
from tests.gpu_runtime.test_model_server import TOL, _next, _server, _warm_up

# per adapter: a different prompt length and sampling setup (greedy, seeded with temperature, top_p, top_k,
# several samples, stop ids, max_tokens), so rows differ in everything a call can set
CALLS = {
    "a": Sample([257, 10, 20, 30], 2, SamplingParams(max_tokens=6, seed=11, stop=[])),
    "b": Sample([40, 50], 1, SamplingParams(max_tokens=4, temperature=0, stop=[])),
    "c": Sample([7, 8, 9, 10, 11, 12], 3, SamplingParams(max_tokens=5, temperature=0.7, top_p=0.9, seed=5)),
    "base": Sample([3, 4, 5], 2, SamplingParams(max_tokens=6, temperature=1.3, top_k=7, seed=2, stop=[])),
}


def _counting_passes(s: ModelServer) -> list[int]:
    """How many calls each decode pass of `s` held."""
    passes: list[int] = []
    decode = s.sampler._decode

    def counted(calls):
        passes.append(len(calls))
        return decode(calls)

    s.sampler._decode = counted  # type: ignore[method-assign]
    return passes


def test_sample_calls_of_several_adapters_decode_in_one_pass_and_equal_each_call_alone():
    s = _server()
    _warm_up(s)
    s.create_sampler("base")
    passes = _counting_passes(s)
    for mid, op in CALLS.items():
        s.submit(mid, _next(s, mid), op)
    s.submit("a", _next(s, "a") + 1, CALLS["a"])  # the same call again, queued behind: same pass, same draws
    batched = s.step()
    assert passes == [5] and len(batched) == 5 and s.pending() == 0
    alone = {mid: s.call(mid, _next(s, mid), op) for mid, op in CALLS.items()}
    assert passes == [5, 1, 1, 1, 1]
    for o in batched:
        got, ref = o.unwrap(), alone[o.model_id]
        assert isinstance(got, SampleResult) and isinstance(ref, SampleResult)
        assert o.tokens == len(CALLS[o.model_id].prompt) + sum(len(q.tokens) for q in got.sequences)
        assert [q.tokens for q in got.sequences] == [q.tokens for q in ref.sequences]
        assert [q.stop_reason for q in got.sequences] == [q.stop_reason for q in ref.sequences]
        for g, r in zip(got.sequences, ref.sequences, strict=True):
            torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(r.logprobs), **TOL)
    lengths = {o.model_id: [len(q.tokens) for q in o.unwrap().sequences] for o in batched}  # type: ignore[union-attr]
    assert lengths["a"] == [6, 6] and lengths["b"] == [4] and lengths["base"] == [6, 6]
    # the adapters really differ: the same greedy call under another adapter gives other log-probs
    greedy = Sample([40, 50], 1, SamplingParams(max_tokens=4, temperature=0, stop=[]))
    a = s.call("a", _next(s, "a"), greedy)
    assert isinstance(a, SampleResult) and isinstance(alone["b"], SampleResult)
    assert not torch.allclose(
        torch.tensor(a.sequences[0].logprobs), torch.tensor(alone["b"].sequences[0].logprobs)
    )


def test_top_k_one_is_greedy_and_top_k_never_samples_outside_the_k_most_likely():
    s = ModelServer("tiny-qwen2")
    s.create_sampler("base")
    prompt = [257, 10, 20, 30]
    greedy = s.call("base", 1, Sample(prompt, 1, SamplingParams(max_tokens=5, temperature=0, stop=[])))
    top1 = s.call(
        "base", 2, Sample(prompt, 4, SamplingParams(max_tokens=5, temperature=1.5, top_k=1, seed=3))
    )
    assert isinstance(greedy, SampleResult) and isinstance(top1, SampleResult)
    assert all(q.tokens == greedy.sequences[0].tokens for q in top1.sequences)
    with torch.no_grad():
        logits = s.host.model(input_ids=torch.tensor([prompt])).logits[0, -1]
    best = set(logits.topk(3).indices.tolist())
    wide = SamplingParams(max_tokens=1, temperature=5.0, top_k=3, seed=4)  # flat: unrestricted, it strays
    out = s.call("base", 3, Sample(prompt, 64, wide))
    assert isinstance(out, SampleResult)
    got = {q.tokens[0] for q in out.sequences}
    assert got <= best and len(got) == 3
    free = s.call("base", 4, Sample(prompt, 64, SamplingParams(max_tokens=1, temperature=5.0, seed=4)))
    assert isinstance(free, SampleResult) and not {q.tokens[0] for q in free.sequences} <= best


def test_top_k_then_top_p_on_an_exact_small_vocabulary():
    """p = [.5, .2, .15, .1, .05]. top_k=3 keeps ids 0-2; top_p=.75 after it keeps 0-1 (renormalised mass
    before id 2 is .82); top_p=.75 alone keeps 0-2 (mass before id 2 is .7); top_k=1 is the argmax. Each row
    drawn 4,000 times with the exponential race; log-probs are of the untruncated distribution."""
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    rows = [
        (3, 1.0, {0, 1, 2}),
        (3, 0.75, {0, 1}),
        (5, 0.75, {0, 1, 2}),
        (1, 1.0, {0}),
        (5, 1.0, {0, 1, 2, 3, 4}),
    ]
    n = 4000
    logits = p.log().repeat(len(rows) * n, 1)
    top_k = torch.tensor([k for k, _, _ in rows]).repeat_interleave(n)
    top_p = torch.tensor([q for _, q, _ in rows]).repeat_interleave(n)
    noise = torch.empty_like(logits).exponential_(generator=torch.Generator().manual_seed(0))
    ids, logp = _choose_rows(logits, torch.ones(len(logits), 1), noise, top_k, top_p)
    for i, (_, _, support) in enumerate(rows):
        assert set(ids[i * n : (i + 1) * n].tolist()) == support, rows[i]
    torch.testing.assert_close(logp, p.log()[ids])
    kept = ids[:n].bincount(minlength=5).float() / n  # top_k=3 alone: p renormalised over the three
    torch.testing.assert_close(kept[:3], p[:3] / p[:3].sum(), atol=0.03, rtol=0)


def test_a_sample_pass_is_bounded_by_its_padded_size_not_the_calls_sum():
    # a: 1 row of a 40-token prompt; b: 8 rows of 2 tokens. Their sizes sum to 41 + 8 * 4 = 73, but one
    # pass pads b's rows to a's prompt: 9 rows x (40 + 2) = 378 token slots, over a budget of 100
    s = _server(max_batch_tokens=100)
    s.create_sampler("base")
    passes = _counting_passes(s)
    s.submit("a", _next(s, "a"), Sample(list(range(1, 41)), 1, SamplingParams(max_tokens=1, seed=1)))
    s.submit("b", _next(s, "b"), Sample([5, 6], 8, SamplingParams(max_tokens=2, seed=2)))
    s.submit("base", _next(s, "base"), Sample([7, 8], 8, SamplingParams(max_tokens=2, seed=3)))
    first = s.step()
    assert passes == [1] and [o.model_id for o in first] == ["a"]
    second = s.step()  # b and base: 16 rows x (2 + 2) = 64, within the budget
    assert passes == [1, 2] and sorted(o.model_id for o in second) == ["b", "base"]
    assert all(o.error is None for o in first + second) and s.pending() == 0


def test_a_call_that_fails_the_batched_pass_fails_alone_and_the_others_get_their_own_outcomes(monkeypatch):
    import time

    from gpu_runtime.model_server import engine

    s = _server()
    s.create_sampler("base")
    decode = s.sampler._decode
    poison = [99, 98, 97]
    lost = [0.0]  # the failed pass's (fake) hour, on the engine's clock
    clock = time.perf_counter
    monkeypatch.setattr(engine.time, "perf_counter", lambda: clock() + lost[0])

    def failing(calls):  # as an out-of-memory would: the whole pass raises when the poison call is in it
        if any(c.prompt == poison for c in calls):
            if len(calls) > 1:
                lost[0] += 3600.0  # a long pass that fails at its end
            raise RuntimeError("CUDA out of memory (simulated)")
        return decode(calls)

    s.sampler._decode = failing  # type: ignore[method-assign]
    alone = {mid: s.call(mid, _next(s, mid), CALLS[mid]) for mid in ("a", "base")}
    s.submit("a", _next(s, "a"), CALLS["a"])
    s.submit("b", _next(s, "b"), Sample(poison, 1, SamplingParams(max_tokens=3, seed=4)))
    s.submit("base", _next(s, "base"), CALLS["base"])
    outcomes = {o.model_id: o for o in s.step()}
    assert s.pending() == 0
    b = outcomes["b"]
    assert b.result is None and b.error is not None and "out of memory" in str(b.error)
    for mid in ("a", "base"):  # seeded: the same tokens as the call alone, nothing of b's
        got, ref = outcomes[mid].unwrap(), alone[mid]
        assert isinstance(got, SampleResult) and isinstance(ref, SampleResult)
        assert [q.tokens for q in got.sequences] == [q.tokens for q in ref.sequences]
        assert outcomes[mid].seconds > 0
    # each metered by its own pass: none of the failed pass's hour is charged to a or base
    assert outcomes["a"].seconds + outcomes["base"].seconds < 3600 and b.seconds == 0


def test_a_stop_string_late_in_a_long_sample_is_found_in_a_few_decodes():
    s = ModelServer("tiny-qwen2")
    tok = s.sampler.tokenizer
    ids = tok.encode("one two " * 600 + "the end. more words after it")
    stop_at = len(tok.encode("one two " * 600 + "the end."))
    decoded = []
    decode = tok.decode

    def counted(token_ids, **kw):
        decoded.append(len(token_ids))
        return decode(token_ids, **kw)

    tok.decode = counted  # type: ignore[method-assign]
    cut = s.sampler._stop_string_end(ids, ["end."])
    assert cut == stop_at and "end." in decode(ids[:cut]) and "end." not in decode(ids[: cut - 1])
    # a scan of every prefix decoded ~n^2/2 tokens; bisection a whole text and ~log2(n) prefixes
    assert len(decoded) <= 2 + len(ids).bit_length()
    assert s.sampler._stop_string_end(ids, ["not there"]) is None
    assert s.sampler._stop_string_end(ids, ["one"]) == len(tok.encode("one"))
