"""Answer match: single-turn, dataset-driven; the prompts and reference answers are the rows of a dataset.

Card: each episode is one row: `prompt` (text, with an optional `system`) or `messages` (a chat ending in a
user turn), and `answer`, the reference. An rl or eval job names the dataset in its spec (`dataset.uri`, with
`dataset.columns` mapping its columns to these roles; the runtime hands the rows over) and the job's seeded,
epoch-shuffled order picks the row of each group; `config.rows` gives rows inline (tests, small sets).
The reward is 1.0 when the completion's answer matches the reference, else 0.0 (GSM8K-style practice, as in
verl's `reward_model.ground_truth` scorers and TRL's accuracy rewards):

- the completion's answer: the last match of `config.extract` (a regex; its first group if it has one), else
  the content of the last `\\boxed{...}`, else the text after the last `####`, else (numeric) the last number
  or (exact) the whole completion; none found scores 0 (metric `answer_found`);
- `config.match` `"numeric"` (default): both sides parsed as numbers (`1,234`, `-3.50`, `$7`; the reference's
  own `#### 42` tail counts, as in GSM8K's worked solutions), equal within 1e-6 of the reference's size;
  `"exact"`: equal after normalisation (case folded, whitespace collapsed, surrounding spaces, `$` and a final
  `.` dropped); `"regex"`: the reference is a regular expression the answer must match in full.

Config: `match`, `extract`, `system_prompt` (shown before every prompt row without a `system`; default none).
"""

from __future__ import annotations

import math
import re
from typing import Any

from opentinker.env.base import Observation, StepResult
from opentinker.env.dataset import DatasetEnvironment

MATCH_MODES = ("numeric", "exact", "regex")
MAX_PATTERN = 256  # characters of a tenant's regex (config `extract`, or a `regex` reference)
PROMPT_ROLES = ("system", "user", "assistant")

_NUM_RE = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\$?\.\d+")
_BOXED_RE = re.compile(r"\\boxed\{([^{}]*)\}")
_SPACE_RE = re.compile(r"\s+")


def parse_number(text: str) -> float | None:
    """The last number in `text` (`1,234`, `-3.5`, `$7`), or None."""
    nums = _NUM_RE.findall(text)
    if not nums:
        return None
    try:
        return float(nums[-1].replace(",", "").replace("$", ""))
    except ValueError:
        return None


def normalize(text: str) -> str:
    """Case folded, whitespace collapsed, surrounding spaces, `$` and one final `.` dropped."""
    t = _SPACE_RE.sub(" ", text).strip().casefold()
    t = t.strip("$ ")
    return t[:-1].rstrip() if t.endswith(".") else t


def _compile(pattern: Any, what: str) -> re.Pattern[str]:
    if not isinstance(pattern, str) or not pattern or len(pattern) > MAX_PATTERN:
        raise ValueError(f"{what} must be a regular expression of 1-{MAX_PATTERN} characters")
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{what} {pattern!r} is not a regular expression ({e})") from None


def extract(completion: str, extractor: re.Pattern[str] | None, mode: str) -> str | None:
    """The completion's final answer (see the module's card), or None when it gave none."""
    if extractor is not None:
        found = list(extractor.finditer(completion))
        if not found:
            return None
        last = found[-1]
        return last.group(1) if extractor.groups else last.group(0)
    boxed = _BOXED_RE.findall(completion)
    if boxed:
        return str(boxed[-1])
    if "####" in completion:
        return completion.rsplit("####", 1)[1]
    if mode == "numeric":
        return completion if parse_number(completion) is not None else None
    return completion


def matches(answer: str, reference: str, mode: str) -> bool:
    if mode == "numeric":
        got = parse_number(answer)
        want = parse_number(reference.rsplit("####", 1)[-1])
        return got is not None and want is not None and math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-6)
    if mode == "exact":
        return normalize(answer) == normalize(reference)
    return _compile(reference, "a regex reference").fullmatch(answer.strip()) is not None


def check_row(row: Any, i: int) -> None:
    """A row the environment can play: `answer`, and `prompt` (text) or `messages` ending in a user turn."""
    if not isinstance(row, dict):
        raise ValueError(f"dataset row {i} is not an object")
    if not isinstance(row.get("answer"), str):
        raise ValueError(f"dataset row {i}: `answer` must be text, not {type(row.get('answer')).__name__}")
    if "messages" in row:
        msgs = row["messages"]
        ok = (
            isinstance(msgs, list)
            and msgs
            and all(
                isinstance(m, dict) and m.get("role") in PROMPT_ROLES and isinstance(m.get("content"), str)
                for m in msgs
            )
        )
        if not ok:
            raise ValueError(f"dataset row {i}: `messages` must be a list of {{role, content}} chat turns")
        if msgs[-1]["role"] != "user":
            last = msgs[-1]["role"]
            raise ValueError(f"dataset row {i}: the prompt's last turn must be the user's, not {last}")
    elif not isinstance(row.get("prompt"), str):
        raise ValueError(f"dataset row {i}: needs a `prompt` (text) or `messages` (a chat)")


class AnswerMatchEnv(DatasetEnvironment):
    name = "answer-match"

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        self.mode = str(config.get("match", "numeric"))
        if self.mode not in MATCH_MODES:
            raise ValueError(f"match must be one of {', '.join(MATCH_MODES)}, not {self.mode!r}")
        pattern = config.get("extract")
        self.extractor = None if pattern is None else _compile(pattern, "extract")
        prompt = config.get("system_prompt", "")
        if not isinstance(prompt, str) or len(prompt) > 10_000:
            raise ValueError("system_prompt must be text of at most 10,000 characters")
        self.default_system = prompt
        for i, row in enumerate(self.rows):
            check_row(row, i)
            if self.mode == "regex":
                _compile(row["answer"], f"dataset row {i}: the regex reference")

    def reset(self, seed: int) -> Observation:
        row = self.select_row(seed)
        if "messages" in row:  # the whole chat is the prompt (the protocol renders it as given)
            msgs = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
            return Observation(msgs[-1]["content"], info={"messages": msgs})
        system = row.get("system") or self.default_system
        if system:
            msgs = [{"role": "system", "content": str(system)}, {"role": "user", "content": row["prompt"]}]
            return Observation(row["prompt"], info={"messages": msgs})
        return Observation(row["prompt"])

    def step(self, action: str) -> StepResult:
        answer = extract(action, self.extractor, self.mode)
        reference = self.row["answer"]
        correct = answer is not None and matches(answer, reference, self.mode)
        metrics = {"answer_found": 1.0 if answer is not None else 0.0}
        return StepResult(None, 1.0 if correct else 0.0, True, {"metrics": metrics, "reference": reference})
