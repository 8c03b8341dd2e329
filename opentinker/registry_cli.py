"""`opentinker models ...` and `opentinker datasets ...`: the organization's registry from the command line.

`models` alone lists the presets and the organization's models (as before, the presets first); `models push
DIR --name NAME` uploads a Hugging Face model directory with progress (a bar on a terminal, a line per file
otherwise) and prints the new version's reference (`acme/my-model@3`) and its validation.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from opentinker.progress import Progress, fmt_bytes


def _push(ctx: Any, kind: str) -> int:
    from opentinker.registry_client import scan

    args = ctx.args
    files = scan(args.path)
    progress = Progress(sum(f.size for f in files), stream=sys.stderr)
    try:
        result = ctx.client().registry.push(
            kind,
            args.name,
            args.path,
            description=args.description or "",
            upload_id=args.resume,
            on_file=lambda name, size: progress.start_file(name),
            on_bytes=progress.advance,
            on_file_done=lambda name, size: progress.finish_file(name, size, verified=False),
        )
    finally:
        progress.close()
    if ctx.json:
        _print_json(result)
        return 0
    version = result.get(kind) or {}
    line = f"pushed {result['ref']}"
    if kind == "model":
        line += f"  status: {version.get('status')}"
        if version.get("validation_error"):
            line += f"  ({version['validation_error']})"
    else:
        columns = ", ".join(c["name"] for c in version.get("columns", []))
        line += f"  {version.get('num_rows')} rows, columns: {columns}"
    print(line)
    return 0 if kind == "dataset" or version.get("status") != "invalid" else 1


def cmd_models_promote(ctx: Any) -> int:
    args = ctx.args
    result = ctx.client().registry.promote(
        args.job_id, args.name, step=args.step, description=args.description or ""
    )
    if ctx.json:
        _print_json(result)
        return 0
    version = result.get("model") or {}
    line = f"promoted {result['ref']}  status: {version.get('status')}"
    if version.get("validation_error"):
        line += f"  ({version['validation_error']})"
    print(line)
    return 0 if version.get("status") != "invalid" else 1


def cmd_models_push(ctx: Any) -> int:
    return _push(ctx, "model")


def cmd_datasets_push(ctx: Any) -> int:
    return _push(ctx, "dataset")


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


def _list(ctx: Any, rows: list[dict[str, Any]], extra: Callable[[dict[str, Any]], str]) -> None:
    # Its own small table (opentinker.cli imports this module; importing it back would be a cycle).
    cells = [
        [v["ref"], v.get("status", "-"), fmt_bytes(v["size_bytes"]), extra(v)]
        for item in rows
        for v in item["versions"]
    ]
    if not cells:
        print("None yet.")
        return
    headers = ["REF", "STATUS", "SIZE", "DETAILS"]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    for row in [headers, *cells]:
        print("  ".join([*(c.ljust(w) for c, w in zip(row[:-1], widths, strict=False)), row[-1]]))


def cmd_models_list(ctx: Any, presets: Callable[[Any], int] | None = None) -> int:
    rows = ctx.client().registry.models()
    if ctx.json:
        _print_json(rows)
        return 0
    _list(
        ctx, rows, lambda v: f"{v['info'].get('model_type', '?')} {v['info'].get('parameters', '?')} params"
    )
    return 0


def cmd_datasets_list(ctx: Any) -> int:
    rows = ctx.client().registry.datasets()
    if ctx.json:
        _print_json(rows)
        return 0
    _list(ctx, rows, lambda v: f"{v['format']} {v['num_rows']} rows")
    return 0


def add_registry_commands(
    sub: Any, common: argparse.ArgumentParser, cmd_presets: Callable[[Any], int]
) -> None:
    """`models` (presets; `list`, `push`) and `datasets` (`list`, `push`)."""

    def add(parent: Any, name: str, func: Callable[[Any], int], summary: str) -> argparse.ArgumentParser:
        p = parent.add_parser(name, parents=[common], help=summary, description=summary)
        p.set_defaults(func=func)
        return p

    models = sub.add_parser("models", parents=[common], help="model presets and your organization's models")
    models.set_defaults(func=cmd_presets)  # `opentinker models` alone: the presets, as before
    msub = models.add_subparsers(dest="models_command", metavar="COMMAND")
    add(msub, "presets", cmd_presets, "list the model presets")
    add(msub, "list", cmd_models_list, "list your organization's models and their versions")
    p = add(msub, "push", cmd_models_push, "upload a Hugging Face model directory as a new version")
    p.add_argument("path", metavar="DIR", help="config.json, *.safetensors and the tokenizer's files")
    p.add_argument("--name", required=True, help="the model's name in your organization's registry")
    p.add_argument("--description", help="a line about it")
    p.add_argument("--resume", metavar="UPLOAD_ID", help="go on with an interrupted upload")

    p = add(msub, "promote", cmd_models_promote, "copy a job's checkpoint into the registry as a new version")
    p.add_argument("job_id", metavar="JOB_ID")
    p.add_argument("--step", type=int, help="the checkpoint's step (default: the latest)")
    p.add_argument("--name", required=True, help="the model's name in your organization's registry")
    p.add_argument("--description", help="a line about it")

    datasets = sub.add_parser("datasets", parents=[common], help="your organization's datasets")
    dsub = datasets.add_subparsers(dest="datasets_command", required=True, metavar="COMMAND")
    add(dsub, "list", cmd_datasets_list, "list your organization's datasets and their versions")
    p = add(dsub, "push", cmd_datasets_push, "upload a JSONL or Parquet file or a saved HF dataset directory")
    p.add_argument("path", metavar="PATH", help="a .jsonl or .parquet file, or a save_to_disk directory")
    p.add_argument("--name", required=True, help="the dataset's name in your organization's registry")
    p.add_argument("--description", help="a line about it")
    p.add_argument("--resume", metavar="UPLOAD_ID", help="go on with an interrupted upload")
