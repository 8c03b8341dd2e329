"""`opentinker tinker sessions|models|weights ...`: what programs built through the Tinker-compatible API.

`sessions list|show ID`, `models list [--session ID]|show MODEL_ID`, `weights list [--model ID]|show REF|
download REF [-o DIR] [--with-optimizer] [--merge-lora]`, where REF is a weights id or its `tinker://` path.
A download is the PEFT adapter (adapter_config.json, adapter_model.safetensors, meta.json); `--merge-lora`
merges it into its base with the runtime's tool (`python -m gpu_runtime merge-lora`, torch and peft in this
Python): the platform never merges, its web tier holds no torch.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from opentinker.errors import OpenTinkerError
from opentinker.merge_tool import merge_lora
from opentinker.progress import Progress, fmt_bytes


def _out() -> tuple[Callable[[Any], None], Callable[..., None], Callable[..., None]]:
    # Its own printers: opentinker.cli imports this module, importing it back would be a cycle. Cells are
    # never cut short: model ids and tinker:// paths are what a user copies into the next command.
    return _print_json, _print_table, _print_fields


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


def _cell(value: Any) -> str:
    return "-" if value is None or value == "" else " ".join(str(value).split())


def _print_table(headers: list[str], rows: Iterable[list[Any]], empty: str) -> None:
    cells = [[_cell(v) for v in row] for row in rows]
    if not cells:
        print(empty)
        return
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    for row in [headers, *cells]:
        print("  ".join([*(c.ljust(w) for c, w in zip(row[:-1], widths, strict=False)), row[-1]]))


def _print_fields(pairs: list[tuple[str, Any]]) -> None:
    width = max(len(k) for k, _ in pairs) + 1
    for key, value in pairs:
        print(f"{key + ':':<{width}} {_cell(value)}")


def _when(value: str | None) -> str:
    return value.replace("T", " ")[:19] if value else "-"


def cmd_sessions_list(ctx: Any) -> int:
    print_json, print_table, _ = _out()
    rows = ctx.client().tinker.sessions()
    if ctx.json:
        print_json(rows)
        return 0
    print_table(
        ["SESSION", "BY", "CREATED", "LAST HEARTBEAT", "FINISHED", "TRAINING", "SAMPLERS"],
        (
            [
                s["id"],
                s["created_by"] or "-",
                _when(s["created_at"]),
                _when(s["last_heartbeat_at"]),
                _when(s["finished_at"]),
                s["training_clients"],
                s["samplers"],
            ]
            for s in rows
        ),
        empty="No Tinker sessions yet.",
    )
    return 0


def cmd_sessions_show(ctx: Any) -> int:
    print_json, _, print_fields = _out()
    s = ctx.client().tinker.session(ctx.args.id)
    if ctx.json:
        print_json(s)
        return 0
    print_fields(
        [
            ("Session", s["id"]),
            ("Created by", s["created_by"] or "-"),
            ("SDK", s["sdk_version"] or "-"),
            ("Tags", ", ".join(s["tags"]) or "-"),
            ("Created", _when(s["created_at"])),
            ("Last heartbeat", _when(s["last_heartbeat_at"])),
            ("Finished", f"{_when(s['finished_at'])} {s['finish_reason']}".strip()),
        ]
    )
    print()
    _models_table(s["models"])
    return 0


def _models_table(rows: list[dict[str, Any]]) -> None:
    _, print_table, _ = _out()
    print_table(
        ["MODEL", "BASE", "RANK", "STEPS", "FWD-BWD", "PENDING", "SAVED", "LAST CALL"],
        (
            [
                m["id"],
                m["base_model"],
                m["lora_rank"] if m["lora_rank"] is not None else "-",
                m["steps"],
                m["forward_backward_calls"],
                m["pending_calls"],
                m["saved_weights"],
                _when(m["last_call_at"]),
            ]
            for m in rows
        ),
        empty="No training clients.",
    )


def cmd_models_list(ctx: Any) -> int:
    print_json, _, _ = _out()
    rows = ctx.client().tinker.models(session=ctx.args.session)
    if ctx.json:
        print_json(rows)
    else:
        _models_table(rows)
    return 0


def cmd_models_show(ctx: Any) -> int:
    print_json, _, print_fields = _out()
    m = ctx.client().tinker.model(ctx.args.id)
    if ctx.json:
        print_json(m)
        return 0
    print_fields(
        [
            ("Model", m["id"]),
            ("Session", m["session"]),
            ("Base model", m["base_model"]),
            ("LoRA rank", m["lora_rank"] if m["lora_rank"] is not None else "-"),
            ("Steps", m["steps"]),
            ("forward_backward calls", m["forward_backward_calls"]),
            ("Pending calls", m["pending_calls"]),
            ("Last call", _when(m["last_call_at"])),
        ]
    )
    print()
    _weights_table(m["weights"])
    return 0


def _weights_table(rows: list[dict[str, Any]]) -> None:
    _, print_table, _ = _out()
    print_table(
        ["ID", "PATH", "BASE", "RANK", "SAVED"],
        ([w["id"], w["path"], w["base_model"], w["lora_rank"] or "-", _when(w["created_at"])] for w in rows),
        empty="No saved weights.",
    )


def cmd_weights_list(ctx: Any) -> int:
    print_json, _, _ = _out()
    rows = ctx.client().tinker.weights(model=ctx.args.model, session=ctx.args.session)
    if ctx.json:
        print_json(rows)
    else:
        _weights_table(rows)
    return 0


def cmd_weights_show(ctx: Any) -> int:
    print_json, print_table, print_fields = _out()
    w = ctx.client().tinker.weights_detail(ctx.args.ref)
    if ctx.json:
        print_json(w)
        return 0
    print_fields(
        [
            ("Path", w["path"]),
            ("Kind", w["kind"]),
            ("Model", w["model"]),
            ("Base model", w["base_model"]),
            ("LoRA rank", w["lora_rank"] if w["lora_rank"] is not None else "-"),
            ("Saved", _when(w["created_at"])),
        ]
    )
    print()
    print_table(
        ["FILE", "SIZE"],
        ([f["name"], fmt_bytes(f["size"])] for f in w["files"]),
        empty="No files in storage.",
    )
    return 0


def cmd_weights_download(ctx: Any) -> int:
    print_json, _, _ = _out()
    a = ctx.args
    client = ctx.client()
    weights = client.tinker.weights_detail(a.ref)
    dest = Path(a.output or f"{weights['model'].replace(':', '-')}-{weights['name']}")
    if dest.exists():  # before fetching anything, not after the merge
        raise OpenTinkerError(f"{dest} already exists; choose another destination", code="exists")
    if a.merge_lora and a.with_optimizer:
        raise OpenTinkerError("--merge-lora writes a model: leave out --with-optimizer", code="usage")
    fetch_to = dest.parent / f".{dest.name}.merge" / "adapter" if a.merge_lora else dest
    if a.merge_lora:
        shutil.rmtree(fetch_to.parent, ignore_errors=True)
    progress = Progress(0, stream=sys.stderr, tty=None if not ctx.json else False)
    try:
        _, files = client.tinker.download(
            str(weights["id"]),
            fetch_to,
            with_optimizer=a.with_optimizer,
            on_file=lambda name, size: _start(progress, name, size),
            on_bytes=progress.advance,
        )
        for f in files:
            progress.finish_file(f["name"], f["size"], verified=False)
    finally:
        progress.close()
    try:
        if a.merge_lora:
            merge_lora(fetch_to, dest, base=weights["base_model"])
    finally:
        if a.merge_lora:
            shutil.rmtree(fetch_to.parent, ignore_errors=True)
    size = sum(f["size"] for f in files)
    summary = {"path": str(dest), "weights": weights["path"], "files": len(files), "size": size}
    summary["merged"] = bool(a.merge_lora)
    if ctx.json:
        print_json(summary)
    else:
        what = "a merged model" if a.merge_lora else "a PEFT adapter"
        print(f"Saved {weights['path']} ({len(files)} files, {fmt_bytes(size)}) to {dest} as {what}")
    return 0


def _start(progress: Progress, name: str, size: int) -> None:
    progress.total += size  # the total grows file by file: the listing comes with the download
    progress.start_file(name)


def add_tinker_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    def add(parent: Any, name: str, func: Callable[[Any], int], summary: str) -> argparse.ArgumentParser:
        p = parent.add_parser(name, parents=[common], help=summary, description=summary)
        p.set_defaults(func=func)
        return p

    tinker = sub.add_parser(
        "tinker", parents=[common], help="sessions, training clients and saved weights of the Tinker API"
    ).add_subparsers(dest="tinker_command", required=True, metavar="WHAT")

    sessions = tinker.add_parser("sessions", parents=[common], help="Tinker API sessions")
    ssub = sessions.add_subparsers(dest="sessions_command", required=True, metavar="COMMAND")
    add(ssub, "list", cmd_sessions_list, "list your organization's sessions, newest first")
    p = add(ssub, "show", cmd_sessions_show, "show a session and its training clients")
    p.add_argument("id", metavar="SESSION_ID")

    models = tinker.add_parser("models", parents=[common], help="training clients (LoRA adapters)")
    msub = models.add_subparsers(dest="tmodels_command", required=True, metavar="COMMAND")
    p = add(msub, "list", cmd_models_list, "list training clients: base, LoRA rank, steps, saved weights")
    p.add_argument("--session", metavar="SESSION_ID", help="only this session's")
    p = add(msub, "show", cmd_models_show, "show a training client and its saved weights")
    p.add_argument("id", metavar="MODEL_ID")

    weights = tinker.add_parser("weights", parents=[common], help="saved weights (tinker:// paths)")
    wsub = weights.add_subparsers(dest="weights_command", required=True, metavar="COMMAND")
    p = add(wsub, "list", cmd_weights_list, "list saved weights with their tinker:// paths")
    p.add_argument("--model", metavar="MODEL_ID", help="only this training client's")
    p.add_argument("--session", metavar="SESSION_ID", help="only this session's")
    p = add(wsub, "show", cmd_weights_show, "show saved weights and their files")
    p.add_argument("ref", metavar="REF", help="a weights id or its tinker:// path")
    p = add(wsub, "download", cmd_weights_download, "download saved weights as a PEFT adapter directory")
    p.add_argument("ref", metavar="REF", help="a weights id or its tinker:// path")
    p.add_argument("-o", "--output", help="the new directory (default: MODEL-NAME here)")
    p.add_argument("--with-optimizer", action="store_true", help="also the Adam moments (a saved state's)")
    p.add_argument(
        "--merge-lora",
        action="store_true",
        help="merge the adapter into its base: a full Hugging Face model (needs torch, transformers and "
        "peft in this Python: gpu_runtime merge-lora)",
    )
