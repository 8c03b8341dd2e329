"""RL prompt datasets: a job's `dataset` (JSONL, Parquet or a saved Hugging Face dataset, loaded with
`datasets` as for SFT) mapped by `dataset.columns` to the rows an environment plays (`prompt` or `messages`,
optional `system`, and the reference `answer`), and the order a job walks them in.

The order is a pure function of (job seed, epoch): step s's group g plays position (s-1)*B + g of the stream
of per-epoch shuffles of the training rows, as SFT batches do (`SFTDataset.batch`), so a resumed job plays
exactly the rows an uninterrupted one would. `eval_rows` holds the dataset's last rows out of that stream for
evaluation (the same rows whatever the job's seed, so runs compare).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from gpu_runtime.data.sft import load_rows
from opentinker.spec import DatasetSpec

MAX_PROMPT_ROWS = 1_000_000


def map_rows(rows: list[dict[str, Any]], columns: dict[str, str] | None, uri: str) -> list[dict[str, Any]]:
    """Rows in the environment's terms (`prompt` or `messages`, `system`, `answer`), named by `columns` or by
    those default names (a `prompt` column, else `messages`; and `answer`)."""
    if not rows:
        raise ValueError(f"{uri}: no rows")
    if len(rows) > MAX_PROMPT_ROWS:
        raise ValueError(f"{uri}: {len(rows)} rows, over the limit of {MAX_PROMPT_ROWS}")
    have = set(rows[0])
    if columns is None:
        prompt = "prompt" if "prompt" in have else "messages" if "messages" in have else None
        if prompt is None or "answer" not in have:
            raise ValueError(
                f"{uri}: columns {sorted(have)}: name the prompt column (`prompt` or `messages`) and the "
                "`answer` column in dataset.columns"
            )
        columns = {prompt: prompt, "answer": "answer"} | (
            {"system": "system"} if prompt == "prompt" and "system" in have else {}
        )
    missing = sorted(set(columns.values()) - have)
    if missing:
        raise ValueError(f"{uri}: no column {missing[0]!r} (the dataset has {', '.join(sorted(have))})")
    out = []
    for n, row in enumerate(rows, 1):
        mapped: dict[str, Any] = {}
        for role, column in columns.items():
            value = row.get(column)
            if value is None:
                raise ValueError(f"{uri} row {n}: column {column!r} ({role}) is empty")
            if role == "messages":
                if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
                    raise ValueError(f"{uri} row {n}: column {column!r} is not a list of chat turns")
                mapped[role] = [{"role": str(m.get("role")), "content": str(m.get("content"))} for m in value]
            else:  # a numeric answer column (GSM8K-style 42) is the text "42"
                if isinstance(value, float) and value.is_integer():
                    value = int(value)
                mapped[role] = str(value)
        out.append(mapped)
    return out


def load_prompt_rows(dataset: DatasetSpec) -> list[dict[str, Any]]:
    """The job's dataset as environment rows; the rows checked against the environment's needs by it."""
    rows = map_rows(load_rows(dataset.uri), dataset.columns, dataset.uri)
    if dataset.eval_rows >= len(rows):
        raise ValueError(
            f"{dataset.uri}: eval_rows {dataset.eval_rows} leaves no row to train on ({len(rows)} rows)"
        )
    return rows


@dataclass
class PromptOrder:
    """Which row each group plays: `train` rows shuffled anew each epoch by (seed, epoch); the last
    `held_out` rows (of `train + held_out`) are the evaluation split."""

    train: int
    held_out: int
    seed: int
    _epoch_order: tuple[int, list[int]] | None = field(default=None, init=False, repr=False, compare=False)

    def _order(self, epoch: int) -> list[int]:
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            order = list(range(self.train))
            random.Random(f"prompts/{self.seed}/{epoch}").shuffle(order)  # noqa: S311 (shuffling)
            self._epoch_order = (epoch, order)
        return self._epoch_order[1]

    def row(self, position: int) -> int:
        """The row at `position` (from 0) of the stream of per-epoch shuffles."""
        epoch, k = divmod(position, self.train)
        return self._order(epoch)[k]

    def step_rows(self, step: int, batch_size: int) -> list[int]:
        """The rows of step `step`'s groups (steps count from 1)."""
        return [self.row(p) for p in range((step - 1) * batch_size, step * batch_size)]

    def eval_rows(self) -> list[int]:
        """The held-out rows; every row when none are held out (an eval job over the whole dataset)."""
        if self.held_out == 0:
            return list(range(self.train))
        return list(range(self.train, self.train + self.held_out))
