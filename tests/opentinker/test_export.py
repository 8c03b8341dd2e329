"""``opentinker jobs export ID --to wandb|tensorboard|mlflow|jsonl`` and ``jobs watch --wandb-project``.

Against the real server (uvicorn on the test database): a finished job's points go out through the metrics
API and are read back from what each tracker wrote, with its own reader: W&B's offline run file,
TensorBoard's EventAccumulator, MLflow's client on a local file store, the JSONL lines. Actors: alice (owner
of acme) and bob (member) export acme's job; charlie (owner of globex) gets "not found", nothing written.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from opentinker.cli import main
from opentinker.client import Client
from opentinker.export import fetch_history
from opentinker.spec import JobState, example_rl_spec
from portal.actors import Actor
from portal.services.job_tokens import job_token_issue
from portal.services.jobs import job_submit, job_transition
from tests.api.test_stream import uvicorn_url  # noqa: F401 - the server fixture

from .wandb_records import read_run

BASE = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("builtin_envs")]
STEPS = 7


def expected_rows() -> dict[int, dict[str, float]]:
    """Values exact in float32 (TensorBoard stores scalars as float32); kl only at even steps."""
    rows: dict[int, dict[str, float]] = {}
    for step in range(STEPS):
        rows[step] = {"reward/mean": step * 0.25, "loss": 2.0 - step * 0.125}
        if step % 2 == 0:
            rows[step]["kl"] = step * 0.0625
    return rows


@pytest.fixture
def finished_job(uvicorn_url, alice, acme):  # noqa: F811
    spec = example_rl_spec().model_copy(update={"name": "export-me"})
    job, _ = job_submit(organization=acme, actor=Actor.for_request(alice), spec=spec)
    job = job_transition(job=job, to=JobState.ADMITTED, actor=Actor.system("scheduler"))
    with httpx.Client(
        base_url=f"{uvicorn_url}/api/v1/ingest/jobs/{job.id}",
        headers={"Authorization": f"Bearer {job_token_issue(job)}"},
        timeout=30,
    ) as runtime:
        runtime.post("/state", json={"state": "running"}).raise_for_status()
        points = [
            {"step": s, "name": n, "value": v} for s, row in expected_rows().items() for n, v in row.items()
        ]
        runtime.post("/metrics", json={"points": points}).raise_for_status()
        runtime.post("/state", json={"state": "succeeded"}).raise_for_status()
    return job


@pytest.fixture
def as_user(monkeypatch, tmp_path, uvicorn_url, make_token):  # noqa: F811
    def login(user, org) -> None:
        monkeypatch.setenv("OPENTINKER_URL", uvicorn_url)
        monkeypatch.setenv("OPENTINKER_TOKEN", make_token(user, org))
        monkeypatch.setenv("OPENTINKER_CONFIG", str(tmp_path / "none.json"))

    return login


def test_the_sdk_imports_no_tracker_until_asked():
    code = (
        "import sys, opentinker, opentinker.cli, opentinker.client, opentinker.export\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('wandb', 'tensorboard', 'mlflow')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=BASE, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_history_is_read_whole_in_windows(finished_job, uvicorn_url, alice, acme, make_token):  # noqa: F811
    with Client(uvicorn_url, make_token(alice, acme)) as client:
        whole = fetch_history(client, str(finished_job.id))
        windowed = fetch_history(client, str(finished_job.id), window=3)  # 3 windows: 0-2, 3-5, 6
    assert whole.rows == windowed.rows == expected_rows()
    assert whole.points() == 7 * 2 + 4 and whole.job.name == "export-me"


def test_export_jsonl_and_tensorboard(
    finished_job, as_user, alice, bob, charlie, acme, globex, tmp_path, capsys
):
    job_id = str(finished_job.id)
    as_user(charlie, globex)
    assert main(["jobs", "export", job_id, "--to", "jsonl", "-o", str(tmp_path / "x.jsonl")]) == 1
    assert capsys.readouterr().err == "error: no such job (HTTP 404)\n"
    assert not list(tmp_path.iterdir())

    as_user(bob, acme)
    out = tmp_path / "job.jsonl"
    assert main(["jobs", "export", job_id, "--to", "jsonl", "-o", str(out)]) == 0
    assert capsys.readouterr().out == f"Exported 18 points over 7 steps of job {job_id} to {out}\n"
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert lines[0]["type"] == "job" and lines[0]["job_id"] == job_id and lines[0]["state"] == "succeeded"
    assert lines[0]["spec"]["algorithm"]["name"] == finished_job.spec["algorithm"]["name"]
    assert lines[1:4] == [
        {"type": "metric", "step": 0, "name": "kl", "value": 0.0},
        {"type": "metric", "step": 0, "name": "loss", "value": 2.0},
        {"type": "metric", "step": 0, "name": "reward/mean", "value": 0.0},
    ]
    got = {(x["step"], x["name"]): x["value"] for x in lines[1:]}
    assert got == {(s, n): v for s, row in expected_rows().items() for n, v in row.items()}

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir = tmp_path / "tb"
    assert main(["jobs", "export", job_id, "--to", "tensorboard", "-o", str(logdir)]) == 0
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["kl", "loss", "reward/mean"]
    for name in ("kl", "loss", "reward/mean"):
        want = [(s, row[name]) for s, row in expected_rows().items() if name in row]
        assert [(e.step, e.value) for e in acc.Scalars(name)] == want
    (config,) = acc.Tensors("opentinker/config")
    assert json.loads(config.tensor_proto.string_val[0])["job_id"] == job_id


def test_export_mlflow_to_a_local_store(finished_job, as_user, alice, acme, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    job_id = str(finished_job.id)
    # Naming a local directory is what lets MLflow 3 use its file store (export_mlflow says so to it).
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    as_user(alice, acme)
    store = tmp_path / "mlruns"
    assert main(["jobs", "export", job_id, "--to", "mlflow", "-o", str(store), "--json"]) == 0
    ml = MlflowClient(tracking_uri=store.resolve().as_uri())
    (run,) = ml.search_runs([ml.get_experiment_by_name("opentinker").experiment_id])
    assert run.info.run_name == "export-me" and run.info.status == "FINISHED"
    assert run.data.tags["opentinker.job_id"] == job_id
    assert run.data.params["algorithm.name"] == finished_job.spec["algorithm"]["name"]
    assert run.data.params["algorithm.steps"] == str(finished_job.spec["algorithm"]["steps"])
    for name in ("kl", "loss", "reward/mean"):
        want = [(s, row[name]) for s, row in expected_rows().items() if name in row]
        assert sorted((m.step, m.value) for m in ml.get_metric_history(run.info.run_id, name)) == want


def wandb_rows(run: dict) -> dict[int, dict[str, float]]:
    return {h["_step"]: {k: v for k, v in h.items() if k != "_step"} for h in run["history"]}


def test_export_and_live_mirror_to_wandb_offline(
    finished_job, as_user, bob, acme, tmp_path, monkeypatch, capsys
):
    job_id = str(finished_job.id)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    as_user(bob, acme)
    assert main(["jobs", "export", job_id, "--to", "wandb"]) == 2  # no --project: usage error
    assert "--project" in capsys.readouterr().err

    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "export"))
    (tmp_path / "export").mkdir()
    assert main(["jobs", "export", job_id, "--to", "wandb", "--project", "rl"]) == 0
    (run_dir,) = (tmp_path / "export" / "wandb").glob("offline-run-*")
    run = read_run(run_dir)
    assert (run["id"], run["name"], run["project"]) == (job_id, "export-me", "rl")
    assert run["config"]["algorithm"]["name"] == finished_job.spec["algorithm"]["name"]
    assert run["config"]["opentinker"]["job_id"] == job_id
    assert wandb_rows(run) == expected_rows()

    # The live mirror: `watch` replays the finished job's history, then its end; each step logged once.
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "mirror"))
    (tmp_path / "mirror").mkdir()
    capsys.readouterr()
    assert main(["jobs", "watch", job_id, "--plain", "--wandb-project", "live"]) == 0
    assert f"W&B run {job_id}: 18 points mirrored" in capsys.readouterr().err
    (run_dir,) = (tmp_path / "mirror" / "wandb").glob("offline-run-*")
    run = read_run(run_dir)
    assert run["project"] == "live"
    assert wandb_rows(run) == expected_rows()


def test_mirror_logs_history_in_step_order_then_each_live_step_once(tmp_path, monkeypatch):
    from opentinker.export import WandbMirror, wandb_flush
    from opentinker.types import Job

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    job = Job(id="job-1", name="m", kind="rl", state="running", spec={"seed": 3})
    mirror = WandbMirror(job, "live")
    for name in ("kl", "loss"):  # the history comes by name, then step
        for step in (0, 1):
            mirror.add(step, name, step + (0.5 if name == "kl" else 0.0))
    assert mirror.logged == 0  # nothing before `sync`: a later name may still bring an earlier step
    mirror.sync()
    assert mirror.logged == 2 and mirror.logged_through == 0  # step 1 waits for a later step
    mirror.add(1, "reward", 1.0)  # the same step, in another frame
    mirror.add(2, "loss", 2.0)
    mirror.add(1, "late", 9.0)  # step 1 was logged when step 2 showed up
    mirror.add(2, "kl", float("nan"))  # non-finite: left out
    mirror.finish()
    wandb_flush()
    assert (mirror.logged, mirror.late) == (6, 1)
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    assert wandb_rows(read_run(run_dir)) == {
        0: {"kl": 0.5, "loss": 0.0},
        1: {"kl": 1.5, "loss": 1.0, "reward": 1.0},
        2: {"loss": 2.0},
    }


@pytest.mark.parametrize(
    ("target", "module"), [("wandb", "wandb"), ("tensorboard", "tensorboard"), ("mlflow", "mlflow")]
)
def test_a_missing_tracker_names_the_extra_and_writes_nothing(target, module, tmp_path, monkeypatch):
    from opentinker import export
    from opentinker.types import Job

    monkeypatch.setitem(sys.modules, module, None)  # as if not installed: importing it raises ImportError
    history = export.History(job=Job(id="j", kind="rl", state="succeeded"), rows={0: {"loss": 1.0}})
    call = {
        "wandb": lambda: export.export_wandb(history, "p"),
        "tensorboard": lambda: export.export_tensorboard(history, tmp_path / "tb"),
        "mlflow": lambda: export.export_mlflow(history, tracking_uri=str(tmp_path / "ml")),
    }[target]
    with pytest.raises(export.ExportError) as e:
        call()
    assert (
        str(e.value)
        == f"exporting to {target} needs the {module} package: pip install 'opentinker[{target}]'"
    )
    assert list(tmp_path.iterdir()) == []


def test_mirror_survives_a_replay_in_the_middle_of_the_stream(tmp_path, monkeypatch):
    """A refill (lost publication, Valkey reconnect, reconnect after the stream lost our place) re-sends from
    the database by (name, step), in pages: no step may be written before every name of it is in."""
    from opentinker.export import WandbMirror, wandb_flush
    from opentinker.types import Job, StreamEvent

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))

    def metrics(points, replay=False):
        data = {"points": [{"step": s, "name": n, "value": v} for s, n, v in points]}
        return StreamEvent(
            type="metrics", points=data["points"], data={**data, "replay": True} if replay else data
        )

    def val(step, name):
        return step + {"a": 0.25, "b": 0.5, "c": 0.75}[name]

    mirror = WandbMirror(Job(id="job-2", name="r", kind="rl", state="running", spec={}), "live")
    mirror.feed(metrics([(s, n, val(s, n)) for n in "ab" for s in (0, 1)], replay=True))  # the history
    mirror.feed(StreamEvent(type="sync"))
    # Live, one frame per step; a frame's points in any order.
    for step in (2, 3):
        mirror.feed(metrics([(step, n, val(step, n)) for n in "ba"]))
    assert mirror.logged_through == 2
    # A refill from step 2 (a margin already written) to 6, by name then step, in three pages: the second
    # holds only the tail of "a", so its smallest step (5) says nothing about "b" and "c" still to come.
    mirror.feed(metrics([(s, "a", val(s, "a")) for s in (2, 3, 4)], replay=True))
    mirror.feed(metrics([(s, "a", val(s, "a")) for s in (5, 6)], replay=True))
    assert mirror.logged_through == 2  # nothing written during the replay
    page = [(s, "b", val(s, "b")) for s in (2, 3, 4, 5, 6)] + [(s, "c", val(s, "c")) for s in (3, 4, 5, 6)]
    mirror.feed(metrics(page, replay=True))
    assert mirror.logged_through == 2
    mirror.feed(metrics([(7, "a", val(7, "a")), (6, "b", 99.0)]))  # live again: steps below 6 go out
    assert mirror.logged_through == 5
    mirror.feed(metrics([(3, "d", 0.0)]))  # a straggler for a written step: left out, counted
    mirror.finish()
    wandb_flush()
    # a@2, b@2 are the replay's margin (written already); b@6 replayed, then live again (the latest kept).
    assert (mirror.repeated, mirror.late) == (2, 1)
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    want = {s: {n: val(s, n) for n in "ab"} for s in range(3)}
    want |= {s: {n: val(s, n) for n in "abc"} for s in (3, 4, 5, 6)}
    want[6]["b"] = 99.0
    want[7] = {"a": val(7, "a")}
    assert wandb_rows(read_run(run_dir)) == want


def test_an_existing_destination_is_refused_and_nothing_half_written(
    finished_job, as_user, alice, acme, tmp_path, capsys
):
    job_id = str(finished_job.id)
    as_user(alice, acme)
    out = tmp_path / "job.jsonl"
    out.write_text("mine\n")
    assert main(["jobs", "export", job_id, "--to", "jsonl", "-o", str(out)]) == 1
    assert capsys.readouterr().err == f"error: {out} exists: choose another file, or pass --overwrite\n"
    assert out.read_text() == "mine\n" and sorted(p.name for p in tmp_path.iterdir()) == ["job.jsonl"]
    assert main(["jobs", "export", job_id, "--to", "jsonl", "-o", str(out), "--overwrite"]) == 0
    assert len(out.read_text().splitlines()) == 1 + 18

    logdir = tmp_path / "tb"
    logdir.mkdir()
    (logdir / "events.out.tfevents.old").write_bytes(b"x")
    capsys.readouterr()
    assert main(["jobs", "export", job_id, "--to", "tensorboard", "-o", str(logdir)]) == 1
    assert capsys.readouterr().err == (
        f"error: {logdir} exists and is not an empty directory: choose a new log directory\n"
    )
    assert [p.name for p in logdir.iterdir()] == ["events.out.tfevents.old"]
    assert main(["jobs", "export", job_id, "--to", "tensorboard", "-o", str(logdir), "--overwrite"]) == 2


def test_a_failed_jsonl_write_leaves_no_part_file(tmp_path):
    from opentinker import export
    from opentinker.types import Job

    # A spec JSON cannot encode: the write fails after the .part was opened.
    history = export.History(job=Job(id="j", kind="rl", state="succeeded", spec={"x": {1, 2}}), rows={})
    with pytest.raises(TypeError):
        export.export_jsonl(history, tmp_path / "out.jsonl")
    assert list(tmp_path.iterdir()) == []
