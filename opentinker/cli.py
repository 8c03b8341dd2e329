"""The ``opentinker`` command line: a thin layer over :class:`opentinker.client.Client`.

Human-readable tables by default, ``--json`` for scripts. Exit codes: 0 success, 1 failure (API, network,
a waited-for job that did not succeed), 2 usage or validation errors, 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import getpass
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel

from opentinker import __version__
from opentinker.checkpoint_download import download_checkpoint, pick_checkpoint
from opentinker.client import (
    ENV_TOKEN,
    ENV_URL,
    Client,
    config_path,
    load_config,
    load_spec,
    resolve_credentials,
)
from opentinker.errors import OpenTinkerError, ValidationError
from opentinker.export import (
    TARGETS,
    WandbMirror,
    check_jsonl_destination,
    check_tensorboard_destination,
    export_jsonl,
    export_mlflow,
    export_tensorboard,
    export_wandb,
    fetch_history,
    wandb_flush,
)
from opentinker.merge_tool import merge_lora
from opentinker.progress import Progress, fmt_bytes, is_terminal
from opentinker.registry_cli import add_registry_commands
from opentinker.rollouts_text import rollouts_text
from opentinker.spec import JobState
from opentinker.tinker_cli import add_tinker_commands
from opentinker.types import EnvironmentPackage, Job, JobEvent, MetricSeries, Page, Token
from opentinker.watch_view import DEFAULT_METRICS, WatchView

DEFAULT_URL = "http://localhost:8000"
ClientFactory = Callable[[str, str], Client]


class UsageError(Exception):
    """Bad command-line input found after parsing (exit code 2)."""


# --- config file --------------------------------------------------------------------------------------------


def save_config(data: dict[str, Any], path: Path | None = None) -> Path:
    """Write the config as 0600 JSON, atomically: a crash never leaves a half-written file holding a token."""
    path = path or config_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # created 0600
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


# --- output helpers -----------------------------------------------------------------------------------------


def _to_jsonable(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    if isinstance(obj, list | tuple):
        return [_to_jsonable(o) for o in obj]
    return obj


def print_json(obj: Any) -> None:
    print(json.dumps(_to_jsonable(obj), indent=2))


def print_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], empty: str = "(none)") -> None:
    cells = [[_cell(v) for v in row] for row in rows]
    if not cells:
        print(empty)
        return
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    for row in [list(headers), *cells]:
        # No padding after the last column, so lines carry no trailing spaces.
        padded = [c.ljust(w) for c, w in zip(row[:-1], widths, strict=False)]
        print("  ".join([*padded, row[-1]]))


def print_fields(pairs: Iterable[tuple[str, Any]]) -> None:
    pairs = list(pairs)
    width = max(len(k) for k, _ in pairs) + 1
    for key, value in pairs:
        print(f"{key + ':':<{width}} {_cell(value)}")


def _cell(value: Any, max_len: int = 60) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, datetime):
        return fmt_time(value)
    if isinstance(value, float):
        return fmt_float(value)
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value) or "-"
    text = " ".join(str(value).split())
    return text if len(text) <= max_len else text[: max_len - 3] + "..."


def fmt_time(value: datetime | None) -> str:
    if value is None:
        return "-"
    if value.tzinfo is not None:
        value = value.astimezone(UTC)
    return value.strftime("%Y-%m-%d %H:%M:%S")


def fmt_float(value: float | None) -> str:
    if value is None:
        return "nan"
    return f"{value:.6g}"


def fmt_state(value: Any) -> str:
    """A job state or kind: known ones are enums (whose str() is the class-qualified name), new ones str."""
    return str(value.value) if isinstance(value, enum.Enum) else str(value)


def fmt_event(event: JobEvent) -> str:
    parts = [fmt_time(event.created_at), event.kind]
    if event.from_state or event.to_state:
        parts.append(f"{event.from_state or '-'} -> {event.to_state or '-'}")
    if event.message:
        parts.append(" ".join(event.message.split()))
    return "  ".join(parts)


def more_hint(page: Page[Any], offset: int) -> None:
    shown = len(page.results)
    if offset + shown < page.count:
        print(
            f"(showing {offset + 1}-{offset + shown} of {page.count}; use --limit/--offset for more)",
            file=sys.stderr,
        )


# --- commands -----------------------------------------------------------------------------------------------


class Context:
    """What a command needs: parsed args, output mode and a lazily created client."""

    def __init__(self, args: argparse.Namespace, factory: ClientFactory) -> None:
        self.args = args
        self.json = bool(getattr(args, "json", False))
        self._factory = factory
        self._client: Client | None = None

    def client(self) -> Client:
        if self._client is None:
            url, token = resolve_credentials()
            if not url or not token:
                raise OpenTinkerError(
                    f"not logged in: run `opentinker login` or set {ENV_URL} and {ENV_TOKEN}",
                    code="not_configured",
                )
            self._client = self._factory(url, token)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def cmd_login(ctx: Context) -> int:
    args = ctx.args
    saved_url = None
    with contextlib.suppress(OpenTinkerError):  # a broken old config must not block logging in again
        saved_url = load_config().get("url")
    url = args.url or os.environ.get(ENV_URL) or saved_url or DEFAULT_URL
    token = args.token or _read_token()
    if not token:
        raise UsageError("no token given")
    parsed = urlsplit(url)
    if parsed.scheme == "http" and parsed.hostname not in ("localhost", "127.0.0.1", "::1"):
        print(f"warning: {url} is not https; the token is sent in clear text", file=sys.stderr)
    ctx._client = ctx._factory(url, token)
    me = ctx._client.me()  # verify before saving, so a typo never lands in the config
    path = save_config({"url": url, "token": token})
    if ctx.json:
        print_json(me)
    else:
        org = f" in {me.organization.slug}" if me.organization else ""
        print(f"Logged in to {url} as {me.username}{org}. Saved to {path}.")
    return 0


def _read_token() -> str:
    if sys.stdin is not None and sys.stdin.isatty():
        return getpass.getpass("API token: ").strip()
    # Piped in (`echo $TOKEN | opentinker login`): keeps the token out of argv and shell history.
    return (sys.stdin.readline() if sys.stdin is not None else "").strip()


def cmd_logout(ctx: Context) -> int:
    path = config_path()
    try:
        path.unlink()
    except FileNotFoundError:
        print("Not logged in.")
    else:
        print(f"Logged out: removed {path}. The token stays valid until revoked (opentinker tokens revoke).")
    if os.environ.get(ENV_TOKEN):
        print(f"note: {ENV_TOKEN} is set and still applies", file=sys.stderr)
    return 0


def cmd_whoami(ctx: Context) -> int:
    client = ctx.client()
    me = client.me()
    if ctx.json:
        print_json(me)
        return 0
    org = me.organization
    print_fields(
        [
            ("server", client.base_url),
            ("username", me.username),
            ("email", me.email),
            ("organization", f"{org.slug} ({org.name})" if org and org.name else org.slug if org else None),
            ("role", me.role),
            ("scopes", " ".join(me.scopes)),
            *([("staff", "yes")] if me.is_staff else []),
        ]
    )
    return 0


def cmd_jobs_submit(ctx: Context) -> int:
    args = ctx.args
    try:
        spec = load_spec(args.spec)
    except OSError as exc:
        raise UsageError(f"cannot read {args.spec}: {exc.strerror or exc}") from None
    client = ctx.client()
    job = client.jobs.submit(spec)
    if not args.wait:
        if ctx.json:
            print_json(job)
        else:
            print(f"Submitted job {job.id} ({job.name}): {fmt_state(job.state)}")
        return 0
    if not ctx.json:
        print(f"Submitted job {job.id} ({job.name}); waiting for it to finish (Ctrl-C stops waiting).")
    on_event = None if ctx.json else (lambda e: print(fmt_event(e), flush=True))
    try:
        job = client.jobs.wait(job.id, poll_interval=args.poll_interval, on_event=on_event)
    except KeyboardInterrupt:
        print(f"Stopped waiting; job {job.id} carries on.", file=sys.stderr)
        return 130
    if ctx.json:
        print_json(job)
    else:
        reason = f": {job.state_reason}" if job.state_reason else ""
        print(f"Job {job.id} {fmt_state(job.state)}{reason}")
    return 0 if job.state == JobState.SUCCEEDED else 1


def cmd_jobs_list(ctx: Context) -> int:
    a = ctx.args
    page = ctx.client().jobs.list(state=a.state, kind=a.kind, name=a.name, limit=a.limit, offset=a.offset)
    if ctx.json:
        print_json(page)
        return 0
    print_table(
        ["ID", "NAME", "KIND", "STATE", "GPUS", "CREATED (UTC)"],
        ([j.id, j.name, fmt_state(j.kind), fmt_state(j.state), j.gpus, j.created_at] for j in page.results),
        empty="No jobs.",
    )
    more_hint(page, a.offset)
    return 0


def cmd_jobs_show(ctx: Context) -> int:
    job = ctx.client().jobs.get(ctx.args.id)
    if ctx.json:
        print_json(job)
        return 0
    print_job(job)
    return 0


def print_job(job: Job) -> None:
    state = fmt_state(job.state) + (f" ({job.state_reason})" if job.state_reason else "")
    print_fields(
        [
            ("id", job.id),
            ("name", job.name),
            ("kind", fmt_state(job.kind)),
            ("state", state),
            ("organization", job.organization),
            ("created by", job.created_by),
            ("priority", job.priority),
            ("gpus", job.gpus),
            ("pool", job.pool),
            ("attempt", job.attempt),
            ("created", job.created_at),
            ("started", job.started_at),
            ("finished", job.finished_at),
        ]
    )
    if job.spec:
        print("spec:")
        text = yaml.safe_dump(job.spec, sort_keys=False, default_flow_style=False)
        print("\n".join("  " + line for line in text.rstrip().splitlines()))


def cmd_jobs_cancel(ctx: Context) -> int:
    job = ctx.client().jobs.cancel(ctx.args.id, reason=ctx.args.reason)
    if ctx.json:
        print_json(job)
    else:
        print(f"Cancel requested for job {job.id}: now {fmt_state(job.state)}")
    return 0


def cmd_jobs_metrics(ctx: Context) -> int:
    a = ctx.args
    series = ctx.client().jobs.metrics(
        a.id, names=a.name or None, step_min=a.step_min, step_max=a.step_max, max_points=a.max_points
    )
    if ctx.json:
        print_json(series)
        return 0
    print_table(
        ["NAME", "POINTS", "LAST STEP", "LAST", "MIN", "MAX"],
        map(_metric_row, series),
        empty="No metrics recorded yet.",
    )
    return 0


def _metric_row(s: MetricSeries) -> list[Any]:
    finite = [v for v in s.values if v is not None and math.isfinite(v)]
    last = s.values[-1] if s.values else None
    return [
        s.name + (" (downsampled)" if s.downsampled else ""),
        len(s.values),
        s.steps[-1] if s.steps else None,
        fmt_float(last) if s.values else None,
        min(finite) if finite else None,
        max(finite) if finite else None,
    ]


def cmd_jobs_events(ctx: Context) -> int:
    events = list(ctx.client().jobs.iter_events(ctx.args.id, after=ctx.args.after))
    if ctx.json:
        print_json(events)
        return 0
    print_table(
        ["SEQ", "TIME (UTC)", "KIND", "TRANSITION", "MESSAGE"],
        (
            [
                e.seq,
                e.created_at,
                e.kind,
                f"{e.from_state or '-'} -> {e.to_state or '-'}" if e.from_state or e.to_state else None,
                e.message,
            ]
            for e in events
        ),
        empty="No events.",
    )
    return 0


def cmd_jobs_watch(ctx: Context) -> int:
    """Show a job's live stream until it finishes; exit 0 if it succeeded, 1 otherwise."""
    a = ctx.args
    final = None
    client = ctx.client()
    view = None
    # The mirror runs here, on the user's machine, with their W&B key: the platform never sees it.
    mirror = (
        WandbMirror(client.jobs.get(a.id), a.wandb_project, entity=a.wandb_entity)
        if a.wandb_project
        else None
    )
    if not ctx.json:
        steps = client.jobs.get(a.id).spec.get("algorithm", {}).get("steps")
        live = is_terminal(sys.stdout) if a.live is None else a.live
        view = WatchView(
            sys.stdout,
            total_steps=steps if isinstance(steps, int) else None,
            metrics=a.metric or DEFAULT_METRICS,
            live=live,
            width=shutil.get_terminal_size().columns,
        )
    try:
        for ev in client.jobs.watch(a.id, last_event_id=a.last_event_id):
            if view is None:
                print(json.dumps(_to_jsonable(ev.model_dump(exclude={"data"}))), flush=True)
            else:
                view.feed(ev)
            if mirror is not None:
                mirror.feed(ev)
            if ev.type == "end":
                final = ev.state
    except KeyboardInterrupt:
        print(f"Stopped watching; job {ctx.args.id} carries on.", file=sys.stderr)
        return 130
    finally:
        if mirror is not None:
            mirror.finish()
            wandb_flush()
            late = f", {mirror.late} late points left out" if mirror.late else ""
            print(f"W&B run {mirror.run.id}: {mirror.logged} points mirrored{late}", file=sys.stderr)
    return 0 if final == JobState.SUCCEEDED.value else 1


def cmd_jobs_export(ctx: Context) -> int:
    """Copy a job's metrics (and its spec as the run's config) to a tracker, from this machine."""
    a = ctx.args
    if a.to == "wandb" and not a.project:
        raise UsageError("--to wandb needs --project")
    if a.overwrite and a.to != "jsonl":
        raise UsageError("--overwrite is for --to jsonl only")
    # Checked before the history is read: a long fetch should not end in "exists".
    if a.to == "jsonl":
        check_jsonl_destination(Path(a.output or f"{a.id}.jsonl"), overwrite=a.overwrite)
    elif a.to == "tensorboard":
        check_tensorboard_destination(Path(a.output or Path("runs") / a.id))
    history = fetch_history(ctx.client(), a.id)
    job = history.job
    where: str
    if a.to == "jsonl":
        where = str(export_jsonl(history, Path(a.output or f"{job.id}.jsonl"), overwrite=a.overwrite))
    elif a.to == "tensorboard":
        where = str(export_tensorboard(history, Path(a.output or Path("runs") / job.id)))
    elif a.to == "wandb":
        where = "W&B run " + export_wandb(history, a.project, entity=a.entity)
        wandb_flush()
    else:
        where = "MLflow run " + export_mlflow(history, tracking_uri=a.output, experiment=a.experiment)
    summary = {
        "job": job.id,
        "to": a.to,
        "where": where,
        "steps": len(history.rows),
        "points": history.points(),
    }
    if ctx.json:
        print_json(summary)
    else:
        print(f"Exported {summary['points']} points over {summary['steps']} steps of job {job.id} to {where}")
    return 0


def cmd_jobs_checkpoints(ctx: Context) -> int:
    checkpoints = ctx.client().jobs.checkpoints(ctx.args.id)
    if ctx.json:
        print_json(checkpoints)
        return 0
    print_table(
        ["ID", "STEP", "CREATED (UTC)", "SIZE", "FILES"],
        (
            [c.id, c.step, c.created_at, fmt_bytes(c.size_bytes), [f.name for f in c.files]]
            for c in checkpoints
        ),
        empty="No checkpoints.",
    )
    return 0


def cmd_jobs_rollouts(ctx: Context) -> int:
    r = ctx.client().jobs.rollouts(ctx.args.id, step=ctx.args.step)
    if ctx.json:
        print_json(r)
    else:
        print(rollouts_text(r, role=ctx.args.role, full=ctx.args.full), end="")
    return 0


def cmd_jobs_download(ctx: Context) -> int:
    a = ctx.args
    client = ctx.client()
    if a.checkpoint is None:
        return _download_whole(ctx)
    if a.file is None:
        raise UsageError("name a FILE of checkpoint CKPT, or give only the job ID for the whole checkpoint")
    dest = Path(a.output) if a.output else Path(Path(a.file).name)
    if dest.is_dir():
        dest = dest / Path(a.file).name
    # The listing carries the file's sha256: verify the download against it when it is there.
    sha256 = None
    for checkpoint in client.jobs.checkpoints(a.id):
        if checkpoint.id == a.checkpoint and (f := checkpoint.file(a.file)) is not None:
            sha256 = f.sha256
    path = client.jobs.download(a.id, a.checkpoint, a.file, dest, sha256=sha256)
    size = path.stat().st_size
    if ctx.json:
        print_json({"path": str(path), "size": size, "sha256_verified": bool(sha256)})
    else:
        print(f"Saved {a.file} ({fmt_bytes(size)}) to {path}" + (", sha256 verified" if sha256 else ""))
    return 0


def _download_whole(ctx: Context) -> int:
    a = ctx.args
    client = ctx.client()
    step = pick_checkpoint(client.jobs.checkpoints(a.id), a.step).step
    default = f"{a.id}-step{step}" + (".tar.gz" if a.archive else "")
    dest = Path(a.output or default)
    if dest.exists():  # before fetching anything, not after the merge
        raise OpenTinkerError(f"{dest} already exists; choose another destination", code="exists")
    work = None
    if a.merge_lora:
        if a.archive:
            raise UsageError("--merge-lora writes a directory; leave out --archive")
        # A folder named after the destination, not a fresh temporary one: a rerun after an interruption
        # resumes the adapter's download there (its .partial folder and manifest). A whole adapter left by a
        # failed merge is fetched again: which checkpoint it was is no longer recorded.
        work = dest.parent / f".{dest.name}.merge"
        fetch_to = work / "adapter"
        shutil.rmtree(fetch_to, ignore_errors=True)
    else:
        fetch_to = dest
    progress = Progress(0, stream=sys.stderr, tty=None if not ctx.json else False)
    downloaded = False
    try:
        got = download_checkpoint(
            client,
            a.id,
            fetch_to,
            step=step,
            archive=a.archive,
            with_trainer_state=a.with_trainer_state,
            progress=progress,
        )
        downloaded = True
        if a.merge_lora:
            merge_lora(fetch_to, dest)
    finally:
        if work is not None and downloaded:  # an interrupted download stays, to be resumed
            shutil.rmtree(work, ignore_errors=True)
    summary = {
        "path": str(dest),
        "step": got.checkpoint.step,
        "files": len(got.files),
        "size": got.size,
        "sha256_verified": got.verified,
        "merged": bool(a.merge_lora),
    }
    if ctx.json:
        print_json(summary)
    else:
        print(
            f"Saved checkpoint step {got.checkpoint.step} of job {a.id} ({len(got.files)} files, "
            f"{fmt_bytes(got.size)}, {got.verified} sha256 verified) to {dest}"
            + (" as a merged model" if a.merge_lora else "")
        )
    return 0


def cmd_tokens_create(ctx: Context) -> int:
    a = ctx.args
    created = ctx.client().tokens.create(a.name, a.scope, expires_in_days=a.expires_in_days)
    if ctx.json:
        print_json(created)
    else:
        # The secret alone on stdout, so `TOKEN=$(opentinker tokens create ...)` works; the rest on stderr.
        print(created.token)
        expires = fmt_time(created.expires_at) + " UTC" if created.expires_at else "never"
        print(
            f"Created token {created.name!r} (id {created.id}, scopes {' '.join(created.scopes)}, "
            f"expires {expires}).",
            file=sys.stderr,
        )
        if "tinker" in created.scopes:  # Thinking Machines' tinker SDK refuses keys without its prefix
            print('For the tinker SDK: TINKER_API_KEY="tml-<this token>"', file=sys.stderr)
    print("warning: this is the only time the token is shown; store it somewhere safe now.", file=sys.stderr)
    return 0


def cmd_tokens_list(ctx: Context) -> int:
    page = ctx.client().tokens.list(limit=ctx.args.limit, offset=ctx.args.offset)
    if ctx.json:
        print_json(page)
        return 0
    print_table(
        ["ID", "NAME", "LOOKUP", "SCOPES", "CREATED (UTC)", "EXPIRES", "LAST USED", "STATUS"],
        (
            [t.id, t.name, t.lookup, t.scopes, t.created_at, t.expires_at, t.last_used_at, _token_status(t)]
            for t in page.results
        ),
        empty="No tokens.",
    )
    more_hint(page, ctx.args.offset)
    return 0


def _token_status(t: Token) -> str:
    if t.is_revoked:
        return "revoked"
    if t.expires_at is not None and t.expires_at.tzinfo is not None and t.expires_at <= datetime.now(UTC):
        return "expired"
    return "active"


def cmd_tokens_revoke(ctx: Context) -> int:
    ctx.client().tokens.revoke(ctx.args.id)
    if ctx.json:
        print_json({"id": ctx.args.id, "revoked": True})
    else:
        print(f"Revoked token {ctx.args.id}.")
    return 0


def cmd_quota(ctx: Context) -> int:
    q = ctx.client().quota()
    if ctx.json:
        print_json(q)
        return 0
    print_fields(
        [
            ("max GPUs", q.max_gpus),
            ("borrowing limit GPUs", q.borrowing_limit_gpus),
            ("GPU hours per month", q.gpu_hours_per_month),
            ("max queued jobs", q.max_queued_jobs),
            ("fair-share weight", q.fair_share_weight),
            ("allowed pools", q.allowed_pools),
            ("updated", q.updated_at),
        ]
    )
    return 0


def cmd_envs_list(ctx: Context) -> int:
    a = ctx.args
    page = ctx.client().envs.list(q=a.query, tag=a.tag, limit=a.limit, offset=a.offset, sort=a.sort)
    if ctx.json:
        print_json(page)
        return 0
    print_table(
        ["ENVIRONMENT", "LATEST", "VISIBILITY", "TAGS", "DESCRIPTION"],
        (
            [f"{e.owner}/{e.name}", e.latest_version, e.visibility, e.tags, e.description]
            for e in page.results
        ),
        empty="No environments.",
    )
    more_hint(page, a.offset)
    return 0


def _env_ref(text: str) -> tuple[str, str]:
    owner, sep, name = text.partition("/")
    if not sep or not owner or not name or "/" in name:
        raise UsageError(f"expected OWNER/NAME, got {text!r}")
    return owner, name


def print_env(env: EnvironmentPackage) -> None:
    print_fields(
        [
            ("environment", f"{env.owner}/{env.name}"),
            ("description", env.description),
            ("visibility", env.visibility),
            ("tags", env.tags),
            ("latest valid", env.latest_version),
            ("stars", env.stars),
            ("used by jobs", env.usage_count),
            ("forked from", env.forked_from),
        ]
    )
    rows = []
    for v in env.versions:
        if isinstance(v, dict):
            rows.append(
                [v.get("version"), v.get("status"), (v.get("sha256") or "")[:12], v.get("validation_error")]
            )
        else:
            rows.append([v, "", "", ""])
    print()
    print_table(["VERSION", "STATUS", "SHA256", "VALIDATION ERROR"], rows, empty="No versions.")


def cmd_envs_push(ctx: Context) -> int:
    a = ctx.args
    progress = Progress(0, stream=sys.stderr, tty=None if not ctx.json else False)

    def sent(n: int, total: int) -> None:
        if progress.total == 0:
            progress.total = total
            progress.start_file(f"{Path(a.directory).name or a.directory} (package)")
        progress.advance(n)

    try:
        env = ctx.client().envs.push(a.directory, visibility=a.visibility, on_bytes=sent)
    finally:
        if progress.tty and progress.total:  # a bar on a terminal only: piped, the result line says it all
            progress.finish_file("", progress.done, False)
            progress.close()
    if ctx.json:
        print_json(env)
    newest = env.version_info() or {}
    ref = f"{env.owner}/{env.name}@{newest.get('version', '?')}"
    status = newest.get("status", "?")
    if not ctx.json:
        print(f"published {ref}: {status}")
    if status == "invalid":
        print(f"error: {ref} failed validation: {newest.get('validation_error')}", file=sys.stderr)
        return 1
    return 0


def cmd_envs_show(ctx: Context) -> int:
    env = ctx.client().envs.get(*_env_ref(ctx.args.ref))
    if ctx.json:
        print_json(env)
    else:
        print_env(env)
    return 0


def cmd_envs_star(ctx: Context) -> int:
    owner, name = _env_ref(ctx.args.ref)
    envs = ctx.client().envs
    stars = envs.unstar(owner, name) if ctx.args.remove else envs.star(owner, name)
    if ctx.json:
        print_json({"starred": not ctx.args.remove, "stars": stars})
    else:
        print(f"{'unstarred' if ctx.args.remove else 'starred'} {owner}/{name} ({stars} stars)")
    return 0


def cmd_envs_fork(ctx: Context) -> int:
    owner, name = _env_ref(ctx.args.ref)
    env = ctx.client().envs.fork(owner, name, ctx.args.name)
    if ctx.json:
        print_json(env)
    else:
        print(f"forked {owner}/{name} into {env.owner}/{env.name} ({env.visibility})")
    return 0


def cmd_models(ctx: Context) -> int:
    models = ctx.client().models()
    if ctx.json:
        print_json(models)
        return 0
    print_table(
        ["NAME", "FAMILY", "PARAMS", "DESCRIPTION"],
        ([m.name, m.family, m.params, m.description] for m in models),
        empty="No models.",
    )
    return 0


# --- argument parsing ---------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def build_parser() -> argparse.ArgumentParser:
    # --json is accepted before or after the command; SUPPRESS keeps a subcommand from resetting it to False.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print raw JSON")

    parser = argparse.ArgumentParser(
        prog="opentinker",
        description=f"OpenTinker command line. Credentials come from `opentinker login`, or {ENV_URL} and "
        f"{ENV_TOKEN}, which take precedence.",
    )
    parser.add_argument("--json", action="store_true", help="print raw JSON, for scripts")
    parser.add_argument("--version", action="version", version=f"opentinker {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(parent: Any, name: str, func: Callable[[Context], int], summary: str) -> argparse.ArgumentParser:
        p = parent.add_parser(name, parents=[common], help=summary, description=summary)
        p.set_defaults(func=func)
        return p

    p = add(sub, "login", cmd_login, "verify a token and save it with the server URL")
    p.add_argument("--url", help=f"server URL (default: ${ENV_URL}, the saved URL, or {DEFAULT_URL})")
    p.add_argument("--token", help="API token (default: read from stdin or prompted for)")
    add(sub, "logout", cmd_logout, "forget the saved credentials")
    add(sub, "whoami", cmd_whoami, "show the current user, organization and token scopes")
    add(sub, "quota", cmd_quota, "show the organization's quota")
    add_registry_commands(sub, common, cmd_models)
    add_tinker_commands(sub, common)

    jobs = sub.add_parser("jobs", parents=[common], help="submit and inspect jobs").add_subparsers(
        dest="jobs_command", required=True, metavar="COMMAND"
    )
    p = add(jobs, "submit", cmd_jobs_submit, "submit a job spec (.yaml or .json)")
    p.add_argument("spec", metavar="SPEC", help="path of the job spec file")
    p.add_argument("--wait", action="store_true", help="follow the job's events until it finishes")
    p.add_argument("--poll-interval", type=float, default=2.0, help="seconds between polls with --wait")
    p = add(jobs, "list", cmd_jobs_list, "list jobs")
    p.add_argument("--state", choices=[s.value for s in JobState])
    p.add_argument("--kind", choices=["rl", "sft", "eval"])
    p.add_argument("--name", help="only jobs with this name")
    p.add_argument("--limit", type=_positive_int, default=50)
    p.add_argument("--offset", type=_non_negative_int, default=0)
    p = add(jobs, "show", cmd_jobs_show, "show one job and its spec")
    p.add_argument("id", metavar="ID")
    p = add(jobs, "cancel", cmd_jobs_cancel, "cancel a job")
    p.add_argument("id", metavar="ID")
    p.add_argument("--reason", default="", help="recorded in the job's events")
    p = add(jobs, "metrics", cmd_jobs_metrics, "summarize a job's metric series (--json for every point)")
    p.add_argument("id", metavar="ID")
    p.add_argument("--name", action="append", metavar="N", help="a metric name; repeat for several")
    p.add_argument("--step-min", type=_non_negative_int)
    p.add_argument("--step-max", type=_non_negative_int)
    p.add_argument("--max-points", type=_positive_int)
    p = add(jobs, "events", cmd_jobs_events, "list a job's events")
    p.add_argument("id", metavar="ID")
    p.add_argument("--after", type=_non_negative_int, metavar="SEQ", help="only events after this seq")
    p = add(jobs, "watch", cmd_jobs_watch, "follow a job live (metrics, events, logs) until it finishes")
    p.add_argument("id", metavar="ID")
    p.add_argument("--last-event-id", metavar="ID", help="resume after this stream event id")
    p.add_argument(
        "--metric",
        action="append",
        metavar="NAME",
        help=f"a metric to show; repeat for several (default: any of {', '.join(DEFAULT_METRICS)})",
    )
    p.add_argument(
        "--wandb-project",
        metavar="P",
        help="mirror the metrics into this W&B project from this machine (needs opentinker[wandb])",
    )
    p.add_argument("--wandb-entity", metavar="E", help="the W&B entity (team) of --wandb-project")
    view = p.add_mutually_exclusive_group()
    view.add_argument(
        "--live", dest="live", action="store_true", default=None, help="redrawn view (default on a terminal)"
    )
    view.add_argument(
        "--plain", dest="live", action="store_false", help="plain lines (default when not a terminal)"
    )
    p = add(jobs, "export", cmd_jobs_export, "copy a job's metrics to W&B, TensorBoard, MLflow or JSONL")
    p.add_argument("id", metavar="ID")
    p.add_argument("--to", required=True, choices=TARGETS)
    p.add_argument(
        "-o",
        "--output",
        metavar="PATH",
        help="jsonl: the file (default ID.jsonl); tensorboard: the log directory (default runs/ID); "
        "mlflow: the tracking URI or directory (default $MLFLOW_TRACKING_URI)",
    )
    p.add_argument("--project", metavar="P", help="wandb: the project")
    p.add_argument("--entity", metavar="E", help="wandb: the entity (team)")
    p.add_argument("--experiment", default="opentinker", help="mlflow: the experiment (default opentinker)")
    p.add_argument("--overwrite", action="store_true", help="jsonl: replace an existing file")
    p = add(jobs, "checkpoints", cmd_jobs_checkpoints, "list a job's checkpoints")
    p.add_argument("id", metavar="ID")
    p = add(
        jobs, "rollouts", cmd_jobs_rollouts, "read the episodes recorded at a step (best and worst first)"
    )
    p.add_argument("id", metavar="ID")
    p.add_argument(
        "--step", type=_non_negative_int, metavar="N", help="the step (default: the latest recorded)"
    )
    p.add_argument("--role", metavar="ROLE", help="only this role's episodes (multi-agent)")
    p.add_argument("--full", action="store_true", help="whole texts (default: the last 400 characters)")
    p = add(jobs, "download", cmd_jobs_download, "download a whole checkpoint, or one file of it")
    p.add_argument("id", metavar="ID")
    p.add_argument("checkpoint", metavar="CKPT", nargs="?", help="checkpoint id (with FILE: one file)")
    p.add_argument("file", metavar="FILE", nargs="?", help="file name within the checkpoint")
    p.add_argument(
        "-o",
        "--output",
        metavar="PATH",
        help="destination (default: ./FILE, or ./ID-stepN[.tar.gz] for a whole checkpoint; must not exist)",
    )
    p.add_argument(
        "--step", type=_non_negative_int, metavar="N", help="the checkpoint of step N (default: latest)"
    )
    p.add_argument("--archive", action="store_true", help="write one .tar.gz instead of a directory")
    p.add_argument(
        "--with-trainer-state",
        action="store_true",
        help="include optimizer/scheduler/RNG state (for resuming)",
    )
    p.add_argument(
        "--merge-lora",
        action="store_true",
        help="merge a LoRA adapter into its base: a full Hugging Face model (gpu_runtime merge-lora)",
    )

    tokens = sub.add_parser("tokens", parents=[common], help="manage API tokens").add_subparsers(
        dest="tokens_command", required=True, metavar="COMMAND"
    )
    p = add(tokens, "create", cmd_tokens_create, "create a token; its secret is shown once")
    p.add_argument("name", metavar="NAME")
    p.add_argument(
        "--scope",
        action="append",
        required=True,
        metavar="S",
        help="jobs:read, jobs:write, envs:read, envs:write or org:admin; repeat for several",
    )
    p.add_argument("--expires-in-days", type=_positive_int, metavar="N")
    p = add(tokens, "list", cmd_tokens_list, "list your tokens")
    p.add_argument("--limit", type=_positive_int, default=50)
    p.add_argument("--offset", type=_non_negative_int, default=0)
    p = add(tokens, "revoke", cmd_tokens_revoke, "revoke a token")
    p.add_argument("id", metavar="ID")

    envs = sub.add_parser("envs", parents=[common], help="browse and publish environments").add_subparsers(
        dest="envs_command", required=True, metavar="COMMAND"
    )
    p = add(envs, "list", cmd_envs_list, "list environments you can use")
    p.add_argument("--query", "-q", help="search text")
    p.add_argument("--tag")
    p.add_argument("--sort", choices=["name", "stars", "usage", "recent"])
    p.add_argument("--limit", type=_positive_int, default=50)
    p.add_argument("--offset", type=_non_negative_int, default=0)
    p = add(envs, "push", cmd_envs_push, "pack a package directory and publish it as a new version")
    p.add_argument("directory", metavar="DIR", help="holds opentinker.json (or manifest.json) and the source")
    p.add_argument("--visibility", choices=["private", "organization", "public"])
    p = add(envs, "show", cmd_envs_show, "show an environment, its versions and their validation")
    p.add_argument("ref", metavar="OWNER/NAME")
    p = add(envs, "star", cmd_envs_star, "star an environment (--remove to unstar)")
    p.add_argument("ref", metavar="OWNER/NAME")
    p.add_argument("--remove", action="store_true")
    p = add(envs, "fork", cmd_envs_fork, "copy an environment into your organization (private)")
    p.add_argument("ref", metavar="OWNER/NAME")
    p.add_argument("--name", help="the fork's name (default: the same name)")
    return parser


def main(argv: Sequence[str] | None = None, *, client_factory: ClientFactory | None = None) -> int:
    """Run the CLI and return its exit code. ``client_factory(url, token)`` lets tests inject a transport."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors: argparse has printed already
        return exc.code if isinstance(exc.code, int) else 2
    ctx = Context(args, client_factory or Client)
    try:
        return args.func(ctx)
    except (UsageError, ValidationError) as exc:
        return _fail(exc, 2)
    except OpenTinkerError as exc:
        return _fail(exc, 1)
    except OSError as exc:  # e.g. an unwritable download destination
        return _fail(exc, 1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        ctx.close()


def _fail(exc: BaseException, code: int) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return code
