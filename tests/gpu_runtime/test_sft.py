"""SFT jobs: chat JSONL, assistant-only loss masks, the same loop, checkpoints and sinks as RL."""

from __future__ import annotations

import json

import pytest

from gpu_runtime.controller import EXIT_OK, Controller, LocalGroup
from gpu_runtime.data import SFTDataset, encode_chat, load_chat_jsonl
from gpu_runtime.data.arithmetic_sft import arithmetic_conversations, write_arithmetic_sft
from gpu_runtime.models import build_byte_tokenizer, load_model
from opentinker.env.builtin.arithmetic import ArithmeticEnv
from opentinker.spec import JobSpec
from tests.gpu_runtime.test_controller import ListSink

CHAT = [
    {"role": "system", "content": "S"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "yo"},
    {"role": "user", "content": "ok?"},
    {"role": "assistant", "content": "42"},
]


def test_loss_mask_covers_exactly_assistant_content_and_end_of_turn():
    tok = build_byte_tokenizer()
    ids, mask = encode_chat(tok, CHAT)
    assert ids == tok.apply_chat_template(CHAT, tokenize=True, return_dict=False)
    trained = [t for t, m in zip(ids, mask, strict=True) if m]
    eos = tok.eos_token_id
    assert trained == [*tok.encode("yo"), eos, *tok.encode("42"), eos]


def test_arithmetic_sft_matches_the_environment_prompt_and_answer():
    convs = arithmetic_conversations(5, seed=3, max_operand=9)
    env = ArithmeticEnv(max_operand=9)
    for c in convs:
        assert [m["role"] for m in c] == ["system", "user", "assistant"]
        assert c[0]["content"] == env.system_prompt
        a, b = (int(x) for x in c[1]["content"].removeprefix("What is ").split("?")[0].split(" + "))
        assert 0 <= a <= 9 and 0 <= b <= 9 and c[2]["content"] == str(a + b)
        # The answer gets reward 1 from the environment that produced the prompt.
    assert convs == arithmetic_conversations(5, seed=3, max_operand=9)


def test_load_chat_jsonl_rejects_a_malformed_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"messages": CHAT}) + "\n" + json.dumps({"text": "x"}) + "\n")
    with pytest.raises(ValueError, match="line 2"):
        load_chat_jsonl(f"file://{p}")


def test_batches_are_a_pure_function_of_seed_and_step(tmp_path):
    p = write_arithmetic_sft(tmp_path / "a.jsonl", 6, seed=0, max_operand=9)
    ds = SFTDataset.from_uri(f"file://{p}", build_byte_tokenizer(), seed=1)
    ids = [s.group_id for step in (1, 2, 3) for s in ds.batch(step, 4)]
    # Each epoch (6 examples) is a permutation; step 2 crosses into the second epoch.
    assert sorted(ids[:6]) == list(range(6)) and sorted(ids[6:12]) == list(range(6))
    assert [s.group_id for s in ds.batch(2, 4)] == ids[4:8]


def sft_spec(uri: str, **algorithm) -> JobSpec:
    algo = dict(steps=4, batch_size=4, micro_batch_size=2, learning_rate=1e-3) | algorithm
    return JobSpec.model_validate(
        dict(
            kind="sft",
            model={"base": "tiny-qwen2"},
            dataset={"uri": uri},
            algorithm=algo,
            checkpoint={"every_steps": 2, "keep_last": 5},
            seed=1,
        )
    )


def test_sft_job_lowers_the_loss_reports_metrics_and_saves_a_loadable_model(tmp_path):
    p = write_arithmetic_sft(tmp_path / "a.jsonl", 8, seed=0, max_operand=9)
    spec = sft_spec(f"file://{p}", steps=6)
    sink = ListSink()
    prefix = f"file://{tmp_path}/ck"
    result = Controller(spec, sink, LocalGroup(spec), prefix).run()
    assert result.exit_code == EXIT_OK and result.step == 6
    steps = sink.metric_steps()
    for k in ("loss", "tokens_per_s", "lr", "grad_norm"):
        assert k in steps[1], k
    assert steps[1]["lr"] == pytest.approx(1e-3)
    assert steps[6]["loss"] < steps[1]["loss"] - 1.0  # a byte-level answer is learnable in a few steps
    # Assistant tokens only: 1-2 digit answer + end of turn per example.
    assert all(8 <= steps[s]["tokens/trained"] <= 12 for s in steps)
    ckpts = [r for r in sink.records if r["type"] == "checkpoint"]
    assert [c["step"] for c in ckpts] == [2, 4, 6]
    # The checkpoint is a model directory a later job can start from (model.base = its URI).
    loaded = load_model(ckpts[-1]["uri"])
    assert loaded.tokenizer.apply_chat_template(CHAT, tokenize=True, return_dict=False) == (
        build_byte_tokenizer().apply_chat_template(CHAT, tokenize=True, return_dict=False)
    )


def test_sft_resume_reproduces_the_next_step(tmp_path):
    p = write_arithmetic_sft(tmp_path / "a.jsonl", 8, seed=0, max_operand=9)
    spec = sft_spec(f"file://{p}")
    full = ListSink()
    Controller(spec, full, LocalGroup(spec), f"file://{tmp_path}/a").run()
    resumed = ListSink()
    Controller(spec, resumed, LocalGroup(spec), f"file://{tmp_path}/b").run(
        resume=f"file://{tmp_path}/a/step_000002"
    )
    a, b = full.metric_steps(), resumed.metric_steps()
    assert sorted(b) == [3, 4]
    for s in (3, 4):
        assert b[s]["loss"] == pytest.approx(a[s]["loss"], rel=1e-6, abs=1e-7)
