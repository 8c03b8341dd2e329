"""A job's metrics taken to the trackers people already use: W&B, TensorBoard, MLflow, or plain JSONL.

Runs on the user's machine (``opentinker jobs export``, ``opentinker jobs watch --wandb-project``), so a
tracking key never reaches the platform. Each target's library is imported only inside its function: the SDK
stays importable without them, and they are optional extras (``pip install 'opentinker[wandb]'``,
``[tensorboard]``, ``[mlflow]``).

The metrics API answers at most 5,000 points per series and averages longer ones into buckets, so the history
is read in windows of ``WINDOW`` steps: a series has at most one point per step, so no window is downsampled
and every point is exported as recorded (TensorBoard itself stores scalars as float32).

An existing destination is refused: a JSONL file unless ``overwrite`` (``--overwrite``), a TensorBoard log
directory that is not empty (a second event file there would mix two exports in one run).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opentinker.errors import OpenTinkerError
from opentinker.types import Job, StreamEvent

if TYPE_CHECKING:
    from opentinker.client import Client

WINDOW = 5000  # steps per metrics request: the API's max_points, so a window is never downsampled
TARGETS = ("wandb", "tensorboard", "mlflow", "jsonl")
EXTRAS = {"wandb": "wandb", "tensorboard": "tensorboard", "mlflow": "mlflow"}  # target -> pip extra


class ExportError(OpenTinkerError):
    """An export that cannot run (a missing optional package, a destination that exists, a tracker error)."""


@dataclass
class History:
    """A job and every point it recorded, by step: ``rows[step] = {name: value}`` (None: non-finite)."""

    job: Job
    rows: dict[int, dict[str, float | None]] = field(default_factory=dict)

    def steps(self) -> list[int]:
        return sorted(self.rows)

    def points(self) -> int:
        return sum(len(r) for r in self.rows.values())


def fetch_history(client: Client, job_id: str, *, window: int = WINDOW) -> History:
    """The job and all its points, read window by window (see the module's docstring)."""
    if not 1 <= window <= WINDOW:
        raise ValueError(f"window must be 1..{WINDOW}")
    job = client.jobs.get(job_id)
    history = History(job=job)
    # One bucket per series: its last step (the bucket's step is the largest step in it).
    last = max((s.steps[-1] for s in client.jobs.metrics(job_id, max_points=1) if s.steps), default=None)
    if last is None:
        return history
    for lo in range(0, last + 1, window):
        for s in client.jobs.metrics(job_id, step_min=lo, step_max=lo + window - 1, max_points=window):
            if s.downsampled:  # cannot happen with one point per step; never export averages silently
                raise ExportError(f"the server downsampled {s.name} in steps {lo}..{lo + window - 1}")
            for step, value in s.points():
                history.rows.setdefault(step, {})[s.name] = value
    return history


def _flat(d: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            yield from _flat(v, key + ".")
        else:
            yield key, v


def flat_spec(job: Job) -> dict[str, str]:
    """The spec as dotted keys with JSON values (MLflow params are strings)."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in _flat(job.spec)}


def _finite(row: dict[str, float | None]) -> dict[str, float]:
    return {k: v for k, v in row.items() if v is not None and v == v and abs(v) != float("inf")}


def _require(target: str, module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(
            f"exporting to {target} needs the {module.split('.')[0]} package: "
            f"pip install 'opentinker[{EXTRAS[target]}]'",
            code="missing_extra",
        ) from None


def _meta(job: Job) -> dict[str, Any]:
    return {"job_id": job.id, "name": job.name, "kind": str(job.kind), "state": str(job.state)}


# --- targets ---


def check_jsonl_destination(path: Path, *, overwrite: bool = False) -> None:
    """Refuse a directory, and an existing file unless ``overwrite``: before anything is fetched."""
    path = Path(path)
    if path.is_dir():
        raise ExportError(f"{path} is a directory: give a file name for --to jsonl", code="bad_destination")
    if path.exists() and not overwrite:
        raise ExportError(
            f"{path} exists: choose another file, or pass --overwrite", code="destination_exists"
        )


def check_tensorboard_destination(logdir: Path) -> None:
    """Refuse a file, and a directory that is not empty (its event files would join this export's run)."""
    logdir = Path(logdir)
    if logdir.exists() and (not logdir.is_dir() or any(logdir.iterdir())):
        raise ExportError(
            f"{logdir} exists and is not an empty directory: choose a new log directory",
            code="destination_exists",
        )


def export_jsonl(history: History, path: Path, *, overwrite: bool = False) -> Path:
    """One JSON object a line: first ``{"type": "job", ...}`` with the spec, then ``{"type": "metric",
    "step", "name", "value"}`` by step and name (``value`` null where the job recorded a non-finite one).

    Written to ``PATH.part`` and renamed once complete: never a half-written file under the asked name; the
    ``.part`` is removed if writing fails."""
    path = Path(path)
    check_jsonl_destination(path, overwrite=overwrite)
    tmp = path.with_name(path.name + ".part")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            f.write(json.dumps({"type": "job", **_meta(history.job), "spec": history.job.spec}) + "\n")
            for step in history.steps():
                for name, value in sorted(history.rows[step].items()):
                    f.write(json.dumps({"type": "metric", "step": step, "name": name, "value": value}) + "\n")
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def export_tensorboard(history: History, logdir: Path) -> Path:
    """An event file in ``logdir`` (point TensorBoard at it): one scalar per point, the spec as text."""
    _require("tensorboard", "tensorboard")
    from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    logdir = Path(logdir)
    check_tensorboard_destination(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    writer = EventFileWriter(str(logdir))
    try:
        now = time.time()
        text = json.dumps({**_meta(history.job), "spec": history.job.spec}, indent=2, sort_keys=True)
        config = summary_pb2.Summary.Value(
            tag="opentinker/config",
            metadata=summary_pb2.SummaryMetadata(
                plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text")
            ),
            tensor=tensor_pb2.TensorProto(
                dtype=7,  # DT_STRING
                string_val=[text.encode()],
                tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=[]),
            ),
        )
        writer.add_event(event_pb2.Event(wall_time=now, step=0, summary=summary_pb2.Summary(value=[config])))
        for step in history.steps():
            values = [
                summary_pb2.Summary.Value(tag=name, simple_value=value)
                for name, value in sorted(_finite(history.rows[step]).items())
            ]
            if values:
                writer.add_event(
                    event_pb2.Event(wall_time=now, step=step, summary=summary_pb2.Summary(value=values))
                )
    finally:
        writer.close()
    return logdir


def _wandb_init(job: Job, project: str, entity: str | None, wandb_dir: Path | None) -> Any:  # a wandb Run
    wandb = _require("wandb", "wandb")
    try:
        return wandb.init(
            project=project,
            entity=entity,
            name=job.name or job.id,
            # The job id as the run id: a second export or a restarted mirror continues the same run.
            id=job.id,
            resume="allow",
            job_type=str(job.kind),
            config={**job.spec, "opentinker": _meta(job)},
            dir=str(wandb_dir) if wandb_dir else None,
            reinit="finish_previous",
            # Our own output (a `watch` view) is not the run's: W&B would otherwise wrap stdout and stderr.
            settings=wandb.Settings(console="off"),
        )
    except Exception as exc:  # wandb raises its own types (auth, network, bad project name)
        raise ExportError(f"W&B refused the run: {exc}", code="tracker_error") from exc


def export_wandb(
    history: History, project: str, *, entity: str | None = None, wandb_dir: Path | None = None
) -> str:
    """A W&B run per job (``WANDB_MODE=offline`` writes it locally for ``wandb sync``). Returns the run id."""
    run = _wandb_init(history.job, project, entity, wandb_dir)
    try:
        for step in history.steps():
            row = _finite(history.rows[step])
            if row:
                run.log(row, step=step)
    finally:
        run.finish()
    return str(run.id)


def export_mlflow(
    history: History, *, tracking_uri: str | None = None, experiment: str = "opentinker"
) -> str:
    """An MLflow run in ``experiment`` (created if missing): spec as params, points as metrics with steps.

    ``tracking_uri`` is a server URL or a local directory; default: ``$MLFLOW_TRACKING_URI`` or MLflow's own.
    Returns the run id.
    """
    if tracking_uri and "://" not in tracking_uri:
        tracking_uri = Path(tracking_uri).resolve().as_uri()
    _require("mlflow", "mlflow")
    if tracking_uri and tracking_uri.startswith("file:"):
        # MLflow 3 refuses a local directory unless told that the user means it; naming one is telling it.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.entities import Metric, Param
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    job = history.job
    try:
        client = MlflowClient(tracking_uri=tracking_uri)
        exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
        run = client.create_run(
            exp_id, run_name=job.name or job.id, tags={f"opentinker.{k}": v for k, v in _meta(job).items()}
        )
        run_id = run.info.run_id
        # MLflow caps a param value at 6,000 characters; longer ones are cut with a marker, never refused.
        params = [Param(k, v if len(v) <= 6000 else v[:5990] + "…(cut)") for k, v in flat_spec(job).items()]
        ms = int(time.time() * 1000)
        metrics = [
            Metric(name, value, ms, step)
            for step in history.steps()
            for name, value in sorted(_finite(history.rows[step]).items())
        ]
        for chunk in _chunks(params, 100):  # MLflow's log_batch limits: 100 params, 1,000 metrics a call
            client.log_batch(run_id, params=chunk)
        for chunk in _chunks(metrics, 1000):
            client.log_batch(run_id, metrics=chunk)
        client.set_terminated(run_id, status="FINISHED" if str(job.state) == "succeeded" else "KILLED")
    except MlflowException as exc:
        raise ExportError(f"MLflow refused the run: {exc.message}", code="tracker_error") from exc
    return str(run_id)


def _chunks(items: list[Any], n: int) -> Iterable[list[Any]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def wandb_flush() -> None:
    """Wait until W&B has written everything: ``run.finish()`` returns before its service has flushed the
    run file, and a process that exits at once can leave it empty. Ends this process's W&B service (the CLI
    calls it last; a program with other runs of its own should not)."""
    wandb = _require("wandb", "wandb")
    wandb.teardown()


# --- live mirror ---


class WandbMirror:
    """Mirrors a job's live metrics into a W&B run while ``opentinker jobs watch`` follows its stream.

    W&B needs steps in increasing order, and each step logged once. The stream sends two kinds of metrics
    frames. Live ones hold the points one ingest call brought. Replayed ones (``"replay": true``: the history
    before ``sync``, a refill after a lost publication, a reconnect whose place the stream lost) come from the
    database ordered by metric name, then step, so a later frame may still bring any earlier step. Hence:

    * each frame's points are taken in step order;
    * while a replay is under way nothing is written; it ends at ``sync`` or at the next live frame;
    * otherwise a step is written once a frame shows up whose smallest step is above it (a frame may finish
      an earlier step), and everything left at the end of the stream.

    A point for a step already written is left out: counted in ``repeated`` if it was written (a replay
    re-sends a margin of what was already live), in ``late`` if not (W&B cannot add to a written step).
    """

    def __init__(
        self, job: Job, project: str, *, entity: str | None = None, wandb_dir: Path | None = None
    ) -> None:
        self.run = _wandb_init(job, project, entity, wandb_dir)
        self.pending: dict[int, dict[str, float | None]] = {}
        self.written: dict[int, set[str]] = {}  # names per written step, to tell repeats from late points
        self.synced = False
        self.replaying = False
        self.logged_through = -1
        self.logged = 0
        self.late = 0
        self.repeated = 0

    def feed(self, event: StreamEvent) -> None:
        """One event of the stream, as ``client.jobs.watch`` yields it."""
        if event.type == "metrics":
            self.frame(
                [(p.step, p.name, p.value) for p in event.points], replay=event.data.get("replay") is True
            )
        elif event.type == "sync":
            self.sync()

    def frame(self, points: list[tuple[int, str, float | None]], *, replay: bool = False) -> None:
        """One metrics frame: ``(step, name, value)`` points (None or non-finite values are left out)."""
        if not points:
            return
        if replay:
            self.replaying = True
        elif self.synced:
            self.replaying = False  # live again
        for step, name, value in sorted(points, key=lambda p: p[0]):
            if step <= self.logged_through:
                if name in self.written.get(step, ()):
                    self.repeated += 1
                else:
                    self.late += 1
                continue
            self.pending.setdefault(step, {})[name] = value
        if self.synced and not self.replaying:
            self._flush(below=min(p[0] for p in points))

    def add(self, step: int, name: str, value: float | None) -> None:
        """A single live point (a frame of one)."""
        self.frame([(step, name, value)])

    def sync(self) -> None:
        """The history (or a replay) is in: log it, all but the last step, which a later frame may finish."""
        self.synced = True
        self.replaying = False
        self._flush(below=max(self.pending, default=None))

    def _flush(self, below: int | None = None) -> None:
        for step in sorted(self.pending):
            if below is not None and step >= below:
                break
            self.written[step] = set(self.pending[step])
            row = _finite(self.pending.pop(step))
            if row:
                self.run.log(row, step=step)
                self.logged += len(row)
            self.logged_through = step

    def finish(self) -> None:
        self._flush()
        self.run.finish()
