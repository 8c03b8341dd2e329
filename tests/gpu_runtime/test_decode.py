"""Our decode loop (gpu_runtime/rollout/decode.py) against HFEngine, the trainer's log-probs and itself.

CPU, tiny-qwen2 in fp32. The last test is GPU-only (`pytest -m gpu tests/gpu_runtime/test_decode.py`): the
compiled CUDA-graph step against the eager one, and a rough throughput print.
"""

from __future__ import annotations

import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from gpu_runtime.batch import Sample, collate
from gpu_runtime.models import build_byte_tokenizer, load_model, preset_config
from gpu_runtime.rollout.base import SamplingParams
from gpu_runtime.rollout.decode import StaticDecodeEngine
from gpu_runtime.rollout.hf import HFEngine
from gpu_runtime.trainer import token_logprobs

PAD = 256
# Mixed lengths (left padding) and repeats (the shared prefill): 7 rows, 4 distinct prompts.
PROMPTS = [
    [257, 117, 10, 49, 50, 43, 51],
    [257, 10, 51],
    [257, 117, 10, 49, 50, 43, 51],
    [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],
    [257, 10, 51],
    [257, 117, 10, 49, 50, 43, 51],
    [40, 41],
]


def _model(seed: int = 1, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """tiny-qwen2 with 5x the preset's init scale: at 0.02 a random model's greedy output is one id repeated
    whatever the prompt, which would make every comparison below weak."""
    cfg = preset_config("tiny-qwen2", build_byte_tokenizer())
    cfg.initializer_range = 0.1
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype)


@pytest.fixture(scope="module")
def ours():
    return StaticDecodeEngine(_model(), pad_id=PAD)


@pytest.fixture(scope="module")
def reference():
    return HFEngine(_model(), pad_id=PAD)


def _max_gap(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))


def test_greedy_equals_hf_engine_on_mixed_lengths_with_repeats(ours, reference):
    # (HFEngine without stop ids still stops at the model's own EOS, generate's default: pass it explicitly)
    sp = SamplingParams(max_new_tokens=16, temperature=0.7, greedy=True, stop_ids=(258,))
    a, b = ours.generate(PROMPTS, sp), reference.generate(PROMPTS, sp)
    assert a.token_ids == b.token_ids
    assert [len(t) for t in a.token_ids] == [16] * len(PROMPTS)
    assert a.finished == b.finished == [False] * len(PROMPTS)
    assert a.token_ids[0] == a.token_ids[2] == a.token_ids[5]  # repeated prompts, greedy: same answer
    assert _max_gap(a.logprobs, b.logprobs) < 1e-5  # both at T = 0.7


def test_stop_ids_truncate_like_hf_engine_and_the_loop_ends_early(ours, reference):
    free = ours.generate(PROMPTS, SamplingParams(max_new_tokens=12, greedy=True))
    row1 = free.token_ids[1]
    first = next(j for j in range(2, len(row1)) if row1[j] not in row1[:j])
    stop = row1[first]  # row 1 stops at its first occurrence; other rows wherever that id first appears
    sp = SamplingParams(max_new_tokens=12, greedy=True, stop_ids=(stop,))
    calls = []
    step = ours._step
    ours._step = lambda *a: calls.append(1) or step(*a)
    try:
        res = ours.generate(PROMPTS, sp)
    finally:
        ours._step = step
    assert res.token_ids == reference.generate(PROMPTS, sp).token_ids
    for row, full, fin in zip(res.token_ids, free.token_ids, res.finished, strict=True):
        n = full.index(stop) + 1 if stop in full else len(full)
        assert row == full[:n]  # through the first stop id, inclusive; nothing (no pad) after it
        assert fin == (stop in full)
    assert len(res.token_ids[1]) == first + 1 and res.finished[1]
    assert not all(res.finished)
    assert [len(lp) for lp in res.logprobs] == [len(t) for t in res.token_ids]
    # on CPU "all finished?" is read every step: exactly the steps the longest row needed (the prefill gave
    # the first token)
    assert len(calls) == max(len(t) for t in res.token_ids) - 1


def test_all_rows_stop_at_once_ends_the_call(ours):
    free = ours.generate([[5, 6, 7]] * 3, SamplingParams(max_new_tokens=8, greedy=True))
    sp = SamplingParams(max_new_tokens=8, greedy=True, stop_ids=(free.token_ids[0][0],))
    res = ours.generate([[5, 6, 7]] * 3, sp)
    assert res.token_ids == [free.token_ids[0][:1]] * 3 and res.finished == [True] * 3


def test_sampled_logprobs_equal_the_trainers_token_logprobs(ours):
    torch.manual_seed(0)
    sp = SamplingParams(max_new_tokens=10, temperature=0.7, stop_ids=(258,))
    res = ours.generate(PROMPTS, sp)
    samples = [
        Sample(p + g, [0] * len(p) + [1] * len(g), [0.0] * len(p) + lp, [], 0.0, 0)
        for p, g, lp in zip(PROMPTS, res.token_ids, res.logprobs, strict=True)
    ]
    mb = collate(samples)
    with torch.no_grad():
        lp, _ = token_logprobs(ours.model, mb, 0.7)
    gap = ((lp - mb.rollout_logprobs).abs() * mb.loss_mask).max().item()
    assert gap < 2e-5  # fp32 rounding (prefill + one-token steps vs one forward): 1.1e-5 at this seed
    assert mb.loss_mask.sum().item() == sum(len(t) for t in res.token_ids) > 0


def test_seeded_reproducibility(ours):
    sp = SamplingParams(max_new_tokens=12, temperature=1.0)

    def run(seed: int) -> list[list[int]]:
        torch.manual_seed(seed)  # default engine: the call's generator is seeded from the global RNG
        return ours.generate(PROMPTS, sp).token_ids

    assert run(5) == run(5)
    assert run(5) != run(6)
    a = StaticDecodeEngine(_model(), pad_id=PAD, seed=11)
    b = StaticDecodeEngine(_model(), pad_id=PAD, seed=11)
    first = a.generate(PROMPTS, sp).token_ids
    assert first == b.generate(PROMPTS, sp).token_ids  # an explicit seed: one stream per engine
    assert a.generate(PROMPTS, sp).token_ids != first  # which continues across calls


def test_per_request_seeds_make_a_prompts_tokens_independent_of_its_batch(ours):
    """A prompt's tokens follow from its own seed: alone, in another order, beside other prompts (other
    widths, batch sizes and shared prefills) or split over calls, the same; another seed, other tokens."""
    sp = SamplingParams(max_new_tokens=12, temperature=1.0, stop_ids=(258,))
    seeds = [101, 7, 2**63 - 1, 0, 55, 9, 3]
    whole = ours.generate(PROMPTS, sp, seeds)
    order = [6, 3, 0, 5, 1, 4, 2]
    shuffled = ours.generate([PROMPTS[i] for i in order], sp, [seeds[i] for i in order])
    assert [shuffled.token_ids[order.index(i)] for i in range(7)] == whole.token_ids
    for i in (1, 3, 6):
        alone = ours.generate([PROMPTS[i]], sp, [seeds[i]])
        assert alone.token_ids == [whole.token_ids[i]]
        assert _max_gap(alone.logprobs, [whole.logprobs[i]]) < 1e-5
    # repeated prompts (0, 2, 5) with other seeds: other samples
    assert len({tuple(whole.token_ids[i]) for i in (0, 2, 5)}) == 3
    assert ours.generate([PROMPTS[0]], sp, [102]).token_ids != [whole.token_ids[0]]
    with pytest.raises(ValueError, match="2 seeds for 7 prompts"):
        ours.generate(PROMPTS, sp, [1, 2])
    with pytest.raises(ValueError, match=r"seeds must be in \[0, 2\*\*63\)"):
        ours.generate(PROMPTS[:1], sp, [-1])


def test_sampling_draws_from_softmax_over_temperature(ours):
    """4096 rows of one prompt, one token each: the empirical distribution of the exponential race is as close
    to softmax(z/T) as torch.multinomial's own draws are."""
    prompt, n, temp = [257, 10, 51], 4096, 0.5
    with torch.no_grad():
        z = ours.model(input_ids=torch.tensor([prompt])).logits[0, -1]
    p = torch.softmax(z / temp, -1)
    torch.manual_seed(1)
    res = ours.generate([prompt] * n, SamplingParams(max_new_tokens=1, temperature=temp))
    freq = torch.bincount(torch.tensor([t[0] for t in res.token_ids]), minlength=p.numel()) / n
    ref = torch.bincount(torch.multinomial(p, n, replacement=True), minlength=p.numel()) / n
    tv, tv_ref = (freq - p).abs().sum() / 2, (ref - p).abs().sum() / 2
    assert tv < tv_ref * 1.5 + 0.02, (tv, tv_ref)
    lp = torch.tensor([x[0] for x in res.logprobs])
    assert torch.allclose(lp, torch.log(p[[t[0] for t in res.token_ids]]), atol=1e-5)


def test_top_p_keeps_the_nucleus_and_tiny_top_p_is_greedy(ours):
    greedy = ours.generate(PROMPTS, SamplingParams(max_new_tokens=8, greedy=True))
    torch.manual_seed(2)
    tiny = ours.generate(PROMPTS, SamplingParams(max_new_tokens=8, temperature=1.0, top_p=1e-6))
    assert tiny.token_ids == greedy.token_ids
    prompt, temp, top_p = [257, 10, 51], 0.5, 0.6
    with torch.no_grad():
        z = ours.model(input_ids=torch.tensor([prompt])).logits[0, -1]
    p, order = torch.softmax(z / temp, -1).sort(descending=True)
    keep = int((p.cumsum(0) < top_p).sum()) + 1  # the smallest set of top ids with mass >= top_p
    nucleus = set(order[:keep].tolist())
    torch.manual_seed(3)
    res = ours.generate([prompt] * 512, SamplingParams(max_new_tokens=1, temperature=temp, top_p=top_p))
    drawn = {t[0] for t in res.token_ids}
    assert drawn <= nucleus and len(drawn) > 1
    # log-probs are of the untruncated softmax(z/T), as HFEngine reports them
    lp = torch.log_softmax(z / temp, -1)
    assert all(abs(x[0] - lp[t[0]].item()) < 1e-5 for t, x in zip(res.token_ids, res.logprobs, strict=True))


def test_max_batch_chunks_give_the_same_result():
    sp = SamplingParams(max_new_tokens=10, greedy=True, stop_ids=(258,))
    one = StaticDecodeEngine(_model(), pad_id=PAD, max_batch=64).generate(PROMPTS, sp)
    chunked = StaticDecodeEngine(_model(), pad_id=PAD, max_batch=3).generate(PROMPTS, sp)
    assert chunked.token_ids == one.token_ids and chunked.finished == one.finished
    assert _max_gap(chunked.logprobs, one.logprobs) < 1e-4  # other chunk widths: other float sums


def test_padded_batch_equals_unpadded(ours):
    """What CUDA does to keep one graph: pad 7 rows to 8 (copies of the first prompt, never returned)."""
    sp = SamplingParams(max_new_tokens=6, greedy=True)
    padded = StaticDecodeEngine(_model(), pad_id=PAD, pad_batch=True)
    res = padded.generate(PROMPTS, sp)
    assert padded._bufs.batch == 8
    assert res.token_ids == ours.generate(PROMPTS, sp).token_ids


def test_a_smaller_padded_call_reuses_the_buffers_it_fits_in(ours):
    """A tail chunk or a short eval keeps the same buffers (on CUDA: the same graph) and the same answers."""
    sp = SamplingParams(max_new_tokens=6, greedy=True)
    padded = StaticDecodeEngine(_model(), pad_id=PAD, pad_batch=True)
    padded.generate(PROMPTS, sp)
    held = padded._bufs
    short = SamplingParams(max_new_tokens=4, greedy=True)
    res = padded.generate(PROMPTS[:3], short)
    assert padded._bufs is held and held.batch == 8
    assert res.token_ids == ours.generate(PROMPTS[:3], short).token_ids


def test_bad_input_is_refused(ours):
    sp = SamplingParams(max_new_tokens=4)
    with pytest.raises(ValueError, match="at least one token"):
        ours.generate([[1], []], sp)
    with pytest.raises(ValueError, match="token ids"):
        ours.generate([[1, 320]], sp)
    with pytest.raises(ValueError, match="temperature"):
        ours.generate([[1]], SamplingParams(max_new_tokens=4, temperature=0.0))
    with pytest.raises(ValueError, match="top_p"):
        ours.generate([[1]], SamplingParams(max_new_tokens=4, top_p=0.0))
    with pytest.raises(ValueError, match="1024 positions"):
        ours.generate([[1] * 1000], SamplingParams(max_new_tokens=40))
    with pytest.raises(ValueError, match="CUDA"):
        StaticDecodeEngine(_model(), pad_id=PAD, compile=True)
    assert ours.generate([[1, 2]], SamplingParams(max_new_tokens=0)).token_ids == [[]]


def test_load_weights_is_strict_and_reaches_the_sampler(ours):
    with pytest.raises(RuntimeError):
        ours.load_weights({"nope": torch.zeros(1)})
    other = _model(seed=2)
    engine = StaticDecodeEngine(_model(), pad_id=PAD)
    sp = SamplingParams(max_new_tokens=8, greedy=True, stop_ids=(258,))
    engine.generate(PROMPTS, sp)  # buffers exist before the swap
    engine.load_weights(other.state_dict())
    expected = HFEngine(other, pad_id=PAD).generate(PROMPTS, sp).token_ids
    assert engine.generate(PROMPTS, sp).token_ids == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_cuda_step_matches_eager_and_is_reproducible():
    """Three graphs to compile (bench/gpu_check.sh gives the GPU tests 120 s): fp32 and bf16 greedy on the
    tiny model, bf16 sampling at Qwen2.5-0.5B's shapes (the bench's graph shape, so it reuses the compile)."""

    def engine(compile: bool, dtype: torch.dtype, preset: str = "tiny-qwen2", **kw):
        tiny = preset == "tiny-qwen2"
        model = _model(dtype=dtype) if tiny else load_model(preset, seed=1, dtype=dtype).model
        return StaticDecodeEngine(model, pad_id=PAD, device="cuda", compile=compile, **kw)

    greedy = SamplingParams(max_new_tokens=24, greedy=True, stop_ids=(258,))
    prompts = PROMPTS * 6  # 42 rows: padded to 64 when compiled
    # fp32: the CUDA graph and the eager step agree exactly
    compiled, eager = engine(True, torch.float32), engine(False, torch.float32)
    assert compiled.compiled and not eager.compiled
    a = compiled.generate(prompts, greedy)
    b = eager.generate(prompts, greedy)
    assert a.token_ids == b.token_ids and a.finished == b.finished
    assert _max_gap(a.logprobs, b.logprobs) < 1e-4
    assert compiled._bufs.batch == 64
    assert compiled.generate(prompts[:40], greedy).token_ids == a.token_ids[:40]  # same graph, fewer rows
    # bf16, the rollout dtype on GPU: fused kernels round differently, so a near tie may flip an argmax and
    # the row diverges from there; a wrong cache column or position would leave ~nothing in common
    compiled, eager = engine(True, torch.bfloat16), engine(False, torch.bfloat16)
    g1, g2 = compiled.generate(prompts, greedy), eager.generate(prompts, greedy)
    assert compiled.generate(prompts, greedy).token_ids == g1.token_ids
    pairs = zip(g1.token_ids, g2.token_ids, strict=True)
    agree = [
        next((j for j, (u, v) in enumerate(zip(r1, r2, strict=False)) if u != v), len(r1)) for r1, r2 in pairs
    ]
    total = sum(len(r) for r in g1.token_ids)
    print(f"\nbf16 greedy, compiled vs eager: {sum(agree)}/{total} tokens before rows diverge")
    assert sum(agree) >= 0.8 * total

    # Qwen2.5-0.5B shapes, 256 rows x 128 new tokens: seeded reproducibility and a rough throughput
    big = engine(True, torch.bfloat16, "qwen2.5-0.5b-shape", max_batch=256)
    rows = [[(7 * i + j) % 256 for j in range(128)] for i in range(64) for _ in range(4)]
    sp = SamplingParams(max_new_tokens=128, temperature=1.0)
    torch.manual_seed(9)
    first = big.generate(rows, sp)  # compiles and records the graph
    torch.cuda.synchronize()
    t = time.perf_counter()
    torch.manual_seed(9)
    res = big.generate(rows, sp)
    torch.cuda.synchronize()
    secs = time.perf_counter() - t
    assert res.token_ids == first.token_ids
    n = sum(len(r) for r in res.token_ids)
    assert n == 256 * 128
    print(f"qwen2.5-0.5b-shape bf16, 256 rows x 128 new tokens: {n / secs:,.0f} completion tokens/s")
