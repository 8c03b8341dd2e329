"""SFT data: chat JSONL (`{"messages": [{"role", "content"}, ...]}` per line), or any JSONL, Parquet or
saved Hugging Face dataset whose columns hold chats or prompt/completion pairs (loaded with `datasets`), to
training samples.

Each conversation is rendered with the tokenizer's chat template; the loss mask is 1 exactly on the tokens the
policy would generate for each assistant turn — its content and its end-of-turn token — and 0 on system, user
and tool turns and on template separators (checklist item 6). That is the same token span a rollout samples,
so an SFT warm start teaches precisely what RL later scores.
"""

from __future__ import annotations

import json
import random
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpu_runtime import storage
from gpu_runtime.batch import Sample

Message = dict[str, str]


def load_chat_jsonl(uri: str) -> list[list[Message]]:
    """Conversations from a `file://` or `s3://` JSONL object; a malformed line is an error naming it."""
    text = storage.read_bytes(uri).decode("utf-8")
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            msgs = json.loads(line)["messages"]
            if not isinstance(msgs, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs
            ):
                raise TypeError("messages must be a list of {role, content} strings")
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{uri} line {n}: not a chat record ({e})") from None
        out.append([{"role": m["role"], "content": m["content"]} for m in msgs])
    if not out:
        raise ValueError(f"{uri}: no conversations")
    return out


def _local(uri: str, tmp: str) -> Path:
    """A local path for a dataset file or directory URI (`s3://` ones are downloaded into `tmp`)."""
    if uri.startswith("file://"):
        return storage.download_prefix(uri)  # the path itself
    if uri.endswith((".jsonl", ".parquet")):
        target = Path(tmp) / uri.rsplit("/", 1)[-1]
        target.write_bytes(storage.read_bytes(uri))
        return target
    return storage.download_prefix(uri)


ARROW_RE = re.compile(r"^data-(\d{5})-of-(\d{5})\.arrow$")


def _saved_dataset_rows(path: Path, uri: str) -> list[dict[str, Any]]:
    """The rows of a directory saved by `Dataset.save_to_disk`, from its own data-NNNNN-of-NNNNN.arrow files
    in order. state.json is never read: `load_from_disk` joins the file names it lists onto the directory, so
    an uploaded state.json naming `../other/data-00000-of-00001.arrow` (or an absolute path) would read
    another organization's data."""
    import datasets

    shards = sorted(p.name for p in path.iterdir() if ARROW_RE.match(p.name) and p.is_file())
    numbers = [m.groups() for m in map(ARROW_RE.match, shards) if m]
    if not shards:
        raise ValueError(f"{uri}: a saved dataset without data-NNNNN-of-NNNNN.arrow files")
    if numbers != [(f"{i:05d}", f"{len(shards):05d}") for i in range(len(shards))]:
        raise ValueError(f"{uri}: the arrow files are not one complete set: {', '.join(shards)}")
    parts = [datasets.Dataset.from_file(str(path / name), in_memory=True) for name in shards]
    return list(parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts))


def load_rows(uri: str) -> list[dict[str, Any]]:
    """The rows of a JSONL or Parquet file, or of a directory holding one or a saved Hugging Face dataset
    (`save_to_disk`), loaded with `datasets` (a data format, never a loading script)."""
    import datasets

    with tempfile.TemporaryDirectory(prefix="otk-data-") as tmp:
        path = _local(uri, tmp)
        cache = str(Path(tmp) / "cache")
        if path.is_dir() and (path / "dataset_info.json").is_file() and (path / "state.json").is_file():
            return _saved_dataset_rows(path, uri)
        files = sorted(path.glob("*.parquet")) + sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
        kinds = {f.suffix for f in files}
        if not files or len(kinds) != 1 or not kinds <= {".parquet", ".jsonl"}:
            raise ValueError(f"{uri}: no dataset there (JSONL, Parquet or a saved Hugging Face dataset)")
        builder = "parquet" if kinds == {".parquet"} else "json"
        data = datasets.load_dataset(
            builder, data_files=[str(f) for f in files], split="train", cache_dir=cache, keep_in_memory=True
        )
        return list(data)


def rows_to_conversations(
    rows: list[dict[str, Any]], columns: dict[str, str] | None, uri: str
) -> list[list[Message]]:
    """Chats from table rows: a `messages` column, or `prompt` + `completion` (+ `system`) columns, named by
    `columns` (the spec's mapping) or by those default names."""
    if not rows:
        raise ValueError(f"{uri}: no rows")
    have = set(rows[0])
    if columns is None:
        if "messages" in have:
            columns = {"messages": "messages"}
        elif {"prompt", "completion"} <= have:
            columns = {"prompt": "prompt", "completion": "completion"} | (
                {"system": "system"} if "system" in have else {}
            )
        else:
            raise ValueError(
                f"{uri}: columns {sorted(have)}: name the `messages` column, or `prompt` and `completion`, "
                "in dataset.columns"
            )
    missing = sorted(set(columns.values()) - have)
    if missing:
        raise ValueError(f"{uri}: no column {missing[0]!r} (the dataset has {', '.join(sorted(have))})")
    out: list[list[Message]] = []
    for n, row in enumerate(rows, 1):
        try:
            if "messages" in columns:
                msgs = [
                    {"role": str(m["role"]), "content": str(m["content"])} for m in row[columns["messages"]]
                ]
            else:
                msgs = (
                    [{"role": "system", "content": str(row[columns["system"]])}]
                    if "system" in columns
                    else []
                )
                msgs += [
                    {"role": "user", "content": str(row[columns["prompt"]])},
                    {"role": "assistant", "content": str(row[columns["completion"]])},
                ]
        except (KeyError, TypeError) as e:
            raise ValueError(f"{uri} row {n}: not a chat ({e})") from None
        out.append(msgs)
    return out


def load_conversations(uri: str, columns: dict[str, str] | None = None) -> list[list[Message]]:
    """Chat JSONL as before; anything else (Parquet, saved datasets, column mappings) through `datasets`."""
    if columns is None and uri.endswith(".jsonl"):
        return load_chat_jsonl(uri)
    return rows_to_conversations(load_rows(uri), columns, uri)


def _render(tokenizer: Any, messages: list[Message], *, generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=False, add_generation_prompt=generation_prompt
    )
    return list(ids)


def encode_chat(
    tokenizer: Any, messages: list[Message], max_len: int | None = None
) -> tuple[list[int], list[int]]:
    """(token ids, loss mask) of one conversation; mask 1 on assistant content + its end-of-turn token."""
    eos = tokenizer.eos_token_id
    ids = _render(tokenizer, messages, generation_prompt=False)
    mask = [0] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:i], generation_prompt=True))
        end = len(_render(tokenizer, messages[: i + 1], generation_prompt=False))
        if ids[:end] != _render(tokenizer, messages[: i + 1], generation_prompt=False):
            raise ValueError("the chat template does not render a conversation as a prefix of its extension")
        # Tokens after the end-of-turn token (e.g. ChatML's "\n") are template, never generated.
        seg = ids[start:end]
        stop = next((j + 1 for j, t in enumerate(seg) if t == eos), len(seg))
        for t in range(start, start + stop):
            mask[t] = 1
    if max_len is not None and len(ids) > max_len:
        ids, mask = ids[:max_len], mask[:max_len]
    return ids, mask


@dataclass
class SFTDataset:
    """Tokenized conversations; `batch(step)` is a pure function of (seed, step), so resume is exact."""

    ids: list[list[int]]
    masks: list[list[int]]
    seed: int
    _epoch_order: tuple[int, list[int]] | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def from_uri(
        cls,
        uri: str,
        tokenizer: Any,
        *,
        seed: int,
        max_len: int | None = None,
        columns: dict[str, str] | None = None,
    ) -> SFTDataset:
        ids, masks = [], []
        for conv in load_conversations(uri, columns):
            i, m = encode_chat(tokenizer, conv, max_len)
            if sum(m[1:]):  # a conversation with nothing to learn would only dilute the token-mean
                ids.append(i)
                masks.append(m)
        if not ids:
            raise ValueError(f"{uri}: no conversation has an assistant turn to train on")
        return cls(ids, masks, seed)

    def __len__(self) -> int:
        return len(self.ids)

    def _order(self, epoch: int) -> list[int]:
        # One shuffle per epoch, kept: shuffling anew for every example cost ~0.1 s a step at 2,000 rows.
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            order = list(range(len(self)))
            random.Random(f"{self.seed}/{epoch}").shuffle(order)  # noqa: S311 (shuffling)
            self._epoch_order = (epoch, order)
        return self._epoch_order[1]

    def batch(self, step: int, batch_size: int) -> list[Sample]:
        """Examples (step-1)*B .. step*B-1 of the stream of per-epoch shuffles (steps count from 1)."""
        out = []
        for p in range((step - 1) * batch_size, step * batch_size):
            epoch, k = divmod(p, len(self))
            i = self._order(epoch)[k]
            n = len(self.ids[i])
            out.append(
                Sample(
                    token_ids=list(self.ids[i]),
                    mask=list(self.masks[i]),
                    rollout_logprobs=[0.0] * n,
                    token_rewards=[0.0] * n,
                    reward=0.0,
                    group_id=i,
                )
            )
        return out
