"""RL on a dataset of prompts: rows mapped by the spec's columns, played by opentinker/answer-match in an
order that is a pure function of (seed, epoch), so a resumed job plays exactly the rows an uninterrupted one
does; the held-out rows are evaluated, never trained on."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gpu_runtime.controller import EXIT_OK, Controller, LocalGroup
from gpu_runtime.data.prompts import PromptOrder, map_rows
from opentinker.spec import JobKind, JobSpec
from tests.gpu_runtime.test_controller import ListSink

ROWS = [
    {"question": f"{a}+{b}=", "solution": float(a + b)}
    for a, b in [(1, 2), (3, 4), (2, 2), (5, 1), (0, 7), (4, 4)]
]


def test_the_order_is_a_pure_function_of_seed_and_epoch():
    order = PromptOrder(train=5, held_out=2, seed=3)
    stream = [r for step in range(1, 6) for r in order.step_rows(step, 2)]  # 10 rows: two epochs
    assert sorted(stream[:5]) == sorted(stream[5:]) == [0, 1, 2, 3, 4]
    assert stream[:5] != stream[5:]  # shuffled anew each epoch (seed 3)
    # A fresh object (a resumed job) plays step 3 as the first one did, without walking steps 1-2.
    assert PromptOrder(train=5, held_out=2, seed=3).step_rows(3, 2) == stream[4:6]
    assert order.eval_rows() == [5, 6]
    assert PromptOrder(train=5, held_out=0, seed=3).eval_rows() == [0, 1, 2, 3, 4]


def test_columns_map_rows_and_a_missing_column_is_named():
    rows = map_rows(ROWS, {"prompt": "question", "answer": "solution"}, "u")
    assert rows[1] == {"prompt": "3+4=", "answer": "7"}  # a numeric answer 7.0 is the text "7"
    assert map_rows([{"prompt": "p", "answer": 1, "system": "s"}], None, "u") == [
        {"prompt": "p", "answer": "1", "system": "s"}
    ]
    with pytest.raises(ValueError, match="u: no column 'q' \\(the dataset has question, solution\\)"):
        map_rows(ROWS, {"prompt": "q", "answer": "solution"}, "u")
    with pytest.raises(ValueError, match="name the prompt column"):
        map_rows(ROWS, None, "u")
    with pytest.raises(ValueError, match="u row 2: column 'solution' \\(answer\\) is empty"):
        map_rows(
            [ROWS[0], {"question": "x", "solution": None}], {"prompt": "question", "answer": "solution"}, "u"
        )


def spec_for(uri: str, **dataset) -> JobSpec:
    return JobSpec.model_validate(
        {
            "kind": "rl",
            "model": {"base": "tiny-qwen2"},
            "environment": {"ref": "opentinker/answer-match@1.0.0", "config": {"match": "numeric"}},
            "dataset": {"uri": uri, "columns": {"prompt": "question", "answer": "solution"}} | dataset,
            "algorithm": {
                "name": "grpo",
                "steps": 4,
                "batch_size": 3,
                "group_size": 2,
                "max_new_tokens": 3,
                "learning_rate": 1e-3,
            },
            "checkpoint": {"every_steps": 2, "keep_last": 5},
            "rollouts": {"per_step": 6},
            "seed": 5,
        }
    )


def run(spec, prefix, resume=None):
    """The job, with the environment seeds (= rows) of every collection: (greedy, seeds) in order."""
    sink, group = ListSink(), LocalGroup(spec)
    calls, collect = [], group.rollout.collect

    def spy(seeds, group_ids, torch_seed, greedy=False):
        calls.append((greedy, list(seeds)))
        return collect(seeds, group_ids, torch_seed, greedy)

    group.rollout.collect = spy
    result = Controller(spec, sink, group, prefix).run(resume=resume)
    assert result.exit_code == EXIT_OK
    return sink, calls


def test_an_rl_job_plays_the_dataset_rows_in_order_across_resume_and_evaluates_the_held_out_ones(tmp_path):
    path = tmp_path / "prompts.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    spec = spec_for(f"file://{path}", eval_rows=2, eval_every=2)
    full, calls = run(spec, f"file://{tmp_path}/a")
    train = [seeds for greedy, seeds in calls if not greedy]
    evals = [seeds for greedy, seeds in calls if greedy]
    # 4 training rows (the last 2 held out), 3 groups a step of 2 samples each: steps 1-4 walk 12 positions,
    # i.e. three epochs, each a permutation of rows 0-3.
    rows = [s[0] for step in train for s in zip(step[::2], step[1::2], strict=True) if s[0] == s[1]]
    assert len(rows) == 12 and [sorted(rows[i : i + 4]) for i in (0, 4, 8)] == [[0, 1, 2, 3]] * 3
    assert rows == [r for step in range(1, 5) for r in PromptOrder(4, 2, 5).step_rows(step, 3)]
    assert evals == [[4, 5], [4, 5]]  # the held-out rows, after steps 2 and 4
    steps = full.metric_steps()
    assert steps[2]["eval/episodes"] == steps[4]["eval/episodes"] == 2.0 and "eval/accuracy" not in steps[1]
    # The model is shown the rows' prompts (rollout records: the decoded prompt).
    shown = next(r for r in full.records if r["type"] == "rollouts" and r["step"] == 1)["episodes"]
    questions = {ROWS[r]["question"] for r in rows[:3]}
    assert {q for ep in shown for q in questions if q in ep["prompt"]} == questions
    assert all(sum(q in ep["prompt"] for q in questions) == 1 for ep in shown)

    resumed, again = run(spec, f"file://{tmp_path}/b", resume=f"file://{tmp_path}/a/step_000002")
    assert [s for g, s in again if not g] == train[2:]
    assert [s for g, s in again if g] == [[4, 5]]
    b = resumed.metric_steps()
    assert sorted(b) == [3, 4]
    for s in (3, 4):
        assert b[s]["reward/mean"] == steps[s]["reward/mean"]
        assert b[s]["loss"] == pytest.approx(steps[s]["loss"], rel=1e-6, abs=1e-7)


def test_a_dataset_without_rows_to_train_on_fails_with_its_reason(tmp_path):
    path = tmp_path / "prompts.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    with pytest.raises(ValueError, match="eval_rows 6 leaves no row to train on \\(6 rows\\)"):
        Controller(spec_for(f"file://{path}", eval_rows=6), ListSink(), None, None)


def test_an_eval_job_on_a_dataset_evaluates_every_row_once(tmp_path):
    path = tmp_path / "prompts.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    spec = spec_for(f"file://{path}").model_copy(update={"kind": JobKind.EVAL})
    spec = JobSpec.model_validate(spec.model_dump() | {"algorithm": {"name": "eval", "max_new_tokens": 3}})
    sink, calls = run(spec, None)
    assert calls == [(True, [0, 1, 2, 3, 4, 5])]
    assert sink.metric_steps()[0]["eval/episodes"] == 6.0
