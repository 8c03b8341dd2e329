"""Dataset-backed environments: one episode per row of an uploaded JSONL file.

The dataset comes from `config["dataset"]` (a `file://` URI or a local path to JSONL, one JSON object a line)
or `config["rows"]` (a list of objects, for tests and small inline sets). The seed picks the row, so the same
seed gives the same episode and a job walks the dataset by walking seeds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlparse

from opentinker.env.base import Environment

MAX_DATASET_BYTES = 256 * 1024 * 1024


def load_jsonl(source: str, *, max_bytes: int = MAX_DATASET_BYTES) -> list[dict[str, Any]]:
    """Rows of a JSONL file; errors name the line so a bad upload is easy to fix."""
    if source.startswith("s3://"):
        raise ValueError("s3:// datasets are fetched by the runtime first; pass the local copy")
    path = Path(urlparse(source).path if source.startswith("file://") else source)
    if path.stat().st_size > max_bytes:
        raise ValueError(f"dataset {source} is over {max_bytes} bytes")
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{source}:{lineno}: not JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{source}:{lineno}: each line must be a JSON object")
            rows.append(row)
    return rows


class DatasetEnvironment(Environment):
    """Subclass, set `required_fields`, and use `self.row` (picked by `reset`'s seed) in `reset`/`step`."""

    required_fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        if "rows" in config:
            rows = list(config["rows"])
        elif "dataset" in config:
            rows = load_jsonl(str(config["dataset"]))
        else:
            raise ValueError(f"{type(self).__name__} needs config 'dataset' (a JSONL URI) or 'rows'")
        if not rows:
            raise ValueError("the dataset is empty")
        for i, row in enumerate(rows):
            missing = [f for f in self.required_fields if f not in row]
            if missing:
                raise ValueError(f"dataset row {i} lacks field(s) {', '.join(missing)}")
        self.rows = rows
        self.row: dict[str, Any] = {}

    def select_row(self, seed: int) -> dict[str, Any]:
        self.row = self.rows[seed % len(self.rows)]
        return self.row
