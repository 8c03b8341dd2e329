"""Math word problems: single-turn, dataset-backed.

Card: each episode is one row of an uploaded JSONL dataset with fields ``question`` and ``answer`` (GSM8K
style: the answer may be a worked solution ending in ``#### 42``; only the final number counts).
Config: ``dataset`` (a ``file://`` URI or path of the JSONL) or ``rows`` (inline). The seed picks the row
(seed mod rows). The agent's answer is the content of its last ``\\boxed{...}``, else its last number.
Reward (a Rubric): 1.0 when it equals the reference numerically; the metric ``boxed`` (weight 0) logs
whether it used ``\\boxed``.
"""

from __future__ import annotations

import re
from typing import Any

from opentinker.env.base import Observation, StepResult
from opentinker.env.dataset import DatasetEnvironment
from opentinker.env.rubric import Criterion, Rubric

_NUM_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_BOXED_RE = re.compile(r"\\boxed\{([^{}]*)\}")


def _number(text: str) -> float | None:
    nums = _NUM_RE.findall(text)
    if not nums:
        return None
    try:
        return float(nums[-1].replace(",", ""))
    except ValueError:
        return None


def extract_answer(text: str) -> float | None:
    boxed = _BOXED_RE.findall(text)
    return _number(boxed[-1]) if boxed else _number(text)


def reference_answer(answer: str | int | float) -> float:
    text = str(answer)
    value = _number(text.rsplit("####", 1)[-1])
    if value is None:
        raise ValueError(f"reference answer {answer!r} has no number")
    return value


def correct(completion: str, reference: float, **_: Any) -> float:
    got = extract_answer(completion)
    return 1.0 if got is not None and abs(got - reference) < 1e-6 else 0.0


def boxed(completion: str, **_: Any) -> float:
    return 1.0 if _BOXED_RE.search(completion) else 0.0


class MathWordEnv(DatasetEnvironment):
    name = "math-word"
    system_prompt = "Solve the problem step by step, then give the final answer as \\boxed{number}."
    required_fields = ("question", "answer")
    rubric = Rubric([Criterion(correct, 1.0), Criterion(boxed, 0.0)])

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        for row in self.rows:
            reference_answer(row["answer"])  # fail at load time, not mid-training

    def reset(self, seed: int) -> Observation:
        return Observation(str(self.select_row(seed)["question"]))

    def step(self, action: str) -> StepResult:
        ref = reference_answer(self.row["answer"])
        score = self.rubric.score(action, reference=ref)
        return StepResult(None, score.reward, True, {"metrics": score.metrics, "reference": ref})
