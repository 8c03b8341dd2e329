"""Reads back a W&B run file (``run-<id>.wandb``) as written in offline mode, for the export tests.

wandb ships no Python reader for it any more; the format is LevelDB's log: a 7-byte header (``:W&B``, magic
0xBEE1, version), then 32 KiB blocks of chunks (crc32 uint32, length uint16, type byte: 1 full, 2 first,
3 middle, 4 last), each record a ``wandb.proto.wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BLOCK = 32768
HEADER = 7


def _chunks(data: bytes) -> Iterator[bytes]:
    assert data[:4] == b":W&B", "not a W&B run file"
    pos, record = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            record = chunk
        elif kind == 3:
            record += chunk
        elif kind == 4:
            yield record + chunk
            record = b""


def read_run(run_dir: Path) -> dict[str, Any]:
    """{"id", "name", "project", "config": {...}, "history": [{"_step": n, name: value, ...}, ...]}."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = Path(run_dir).glob("run-*.wandb")
    out: dict[str, Any] = {"config": {}, "history": []}
    for raw in _chunks(path.read_bytes()):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out.update(id=rec.run.run_id, name=rec.run.display_name, project=rec.run.project)
            out["config"].update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in rec.config.update})
        elif kind == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            out["history"].append({k: v for k, v in row.items() if k not in ("_timestamp", "_runtime")})
    return out
