"""deploy/RUNBOOK.md's backup and restore, run as written (`python deploy/backup.py backup|restore DIR`):
jobs, metrics and a checkpoint made the real way on the test database and an object store (a file://
directory, moto's S3), backed up, the store lost, restored into a FRESH database and an empty store; every
job, metric point and checkpoint file is there, byte for byte. A restore over a database that has tables, a
damaged backup and another store URL are refused with nothing written."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from django.conf import settings
from django.db import connection

from opentinker.storage import ObjectStore
from portal.models import Checkpoint, Job, Metric
from portal.services.ingest import checkpoint_prefix, checkpoint_record, metrics_ingest
from tests.workers.conftest import submit

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(180)]

BASE = Path(__file__).resolve().parents[2]
BACKUP = [sys.executable, str(BASE / "deploy" / "backup.py")]


def _url(dbname: str) -> str:
    db = connection.settings_dict
    return f"postgres://{db['USER']}:{db['PASSWORD'] or ''}@{db['HOST']}:{db['PORT']}/{dbname}"


@contextlib.contextmanager
def _new_database() -> Iterator[str]:
    name = f"otk_restore_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(_url("postgres"), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with psycopg.connect(_url("postgres"), autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def fresh_database():
    """A new, empty database on the same server, dropped afterwards."""
    with _new_database() as name:
        yield name


def _run(command: str, directory: Path, database: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "DATABASE_URL": _url(database),
        "OBJECT_STORE_URL": settings.OBJECT_STORE_URL,
        "S3_ENDPOINT_URL": settings.S3_ENDPOINT_URL or "",
    }
    return subprocess.run(
        [*BACKUP, command, str(directory)], env=env, capture_output=True, text=True, cwd="/", check=False
    )


def _rows(dbname: str) -> dict[str, list[tuple]]:
    """The rows that matter, read straight from a database (the restored one has no Django connection)."""
    jobs, metrics, checkpoints = (m._meta.db_table for m in (Job, Metric, Checkpoint))
    queries = {  # the table names are ours
        "jobs": f"SELECT id::text, organization_id, state, name FROM {jobs} ORDER BY id",  # noqa: S608
        "metrics": f"SELECT job_id::text, name, step, value FROM {metrics} ORDER BY 1, 2, 3",  # noqa: S608
        "checkpoints": f"SELECT job_id::text, step, uri, files FROM {checkpoints} ORDER BY 1, 2",  # noqa: S608
        "migrations": "SELECT app, name FROM django_migrations ORDER BY app, name",
    }
    with psycopg.connect(_url(dbname)) as conn:
        return {key: conn.execute(sql).fetchall() for key, sql in queries.items()}


def _make_history(acme) -> tuple[Job, dict[str, bytes]]:
    """Two jobs, six metric points, one checkpoint of two files written to the store then recorded (as a
    runtime does); returns the job with the checkpoint and the files' contents."""
    job, other = submit(acme, name="trained"), submit(acme, name="queued")
    metrics_ingest(
        job=job,
        points=[
            {"step": s, "name": n, "value": v}
            for s in (1, 2, 3)
            for n, v in (("reward/mean", s / 4), ("loss", 2.5 - s))
        ],
    )
    files = {"adapter_model.safetensors": os.urandom(4096), "meta.json": b'{"step": 3}'}
    uri = f"{checkpoint_prefix(job)}/step-3"
    store = ObjectStore(endpoint_url=settings.S3_ENDPOINT_URL, root=settings.OBJECT_STORE_URL)
    for name, data in files.items():
        store.put(f"{uri}/{name}", data)
    checkpoint_record(
        job=job,
        step=3,
        uri=uri,
        files=[
            {"name": n, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in files.items()
        ],
    )
    assert other.pk != job.pk
    return job, files


@pytest.fixture(params=["file", "s3"])
def object_store(request, settings, tmp_path):
    """The store of one test: a file:// directory of its own, or moto's S3 (emptied by `lose`)."""
    if request.param == "s3":
        s3 = request.getfixturevalue("s3_store")

        def lose() -> None:
            httpx.post(f"{s3.endpoint}/moto-api/reset").raise_for_status()  # every bucket and object gone
            s3.client.create_bucket(Bucket=s3.bucket)  # a new, empty bucket of the same name

        return lose
    settings.OBJECT_STORE_URL = f"file://{tmp_path / 'store'}"
    settings.S3_ENDPOINT_URL = None
    return lambda: shutil.rmtree(tmp_path / "store")


def test_the_runbook_gives_these_commands():
    runbook = (BASE / "deploy" / "RUNBOOK.md").read_text()
    assert "python deploy/backup.py backup /backups/" in runbook
    assert "python deploy/backup.py restore /backups/" in runbook


def test_backup_then_restore_into_a_fresh_database_and_store(acme, object_store, fresh_database, tmp_path):
    job, files = _make_history(acme)
    source = connection.settings_dict["NAME"]
    before = _rows(source)
    assert len(before["jobs"]) == 2 and len(before["metrics"]) == 6 and len(before["checkpoints"]) == 1

    backup_dir = tmp_path / "backup-1"
    done = _run("backup", backup_dir, source)
    assert done.returncode == 0, done.stderr
    assert "database and 2 objects" in done.stdout
    assert sorted(p.name for p in backup_dir.iterdir()) == ["db.dump", "manifest.json", "objects"]
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]  # nothing half-written left

    object_store()  # the store is lost
    done = _run("restore", backup_dir, fresh_database)
    assert done.returncode == 0, done.stderr

    after = _rows(fresh_database)
    assert after == before  # every job, metric point, checkpoint row and applied migration
    assert [(s, n, v) for j, n, s, v in after["metrics"] if j == str(job.pk) and n == "reward/mean"] == [
        (1, "reward/mean", 0.25),
        (2, "reward/mean", 0.5),
        (3, "reward/mean", 0.75),
    ]
    ((_, step, uri, listed),) = after["checkpoints"]
    assert step == 3 and sorted(f["name"] for f in listed) == sorted(files)
    store = ObjectStore(endpoint_url=settings.S3_ENDPOINT_URL, root=settings.OBJECT_STORE_URL)
    for entry in listed:  # each file the restored row names is back, with the recorded contents
        data = store.get(f"{uri}/{entry['name']}")
        assert data == files[entry["name"]] and hashlib.sha256(data).hexdigest() == entry["sha256"]

    # Into another fresh database with the objects already in the store (same contents, hashed from the
    # store, streamed on S3): nothing to upload, the database restored.
    with _new_database() as second:
        done = _run("restore", backup_dir, second)
        assert done.returncode == 0, done.stderr
        assert _rows(second) == before

    # Run again over the restored database: refused before anything is written.
    again = _run("restore", backup_dir, fresh_database)
    assert again.returncode == 1 and "is not empty" in again.stderr
    assert _rows(fresh_database) == before

    # A backup into a directory that holds files is refused.
    refused = _run("backup", backup_dir, source)
    assert refused.returncode == 1 and "already holds files" in refused.stderr


def test_a_damaged_backup_or_another_store_is_refused(acme, settings, tmp_path, fresh_database):
    settings.OBJECT_STORE_URL = f"file://{tmp_path / 'store'}"
    settings.S3_ENDPOINT_URL = None
    _make_history(acme)
    backup_dir = tmp_path / "backup"
    assert _run("backup", backup_dir, connection.settings_dict["NAME"]).returncode == 0

    settings.OBJECT_STORE_URL = f"file://{tmp_path / 'elsewhere'}"
    moved = _run("restore", backup_dir, fresh_database)
    assert moved.returncode == 1 and "restore to a store at the same URL" in moved.stderr

    settings.OBJECT_STORE_URL = f"file://{tmp_path / 'store'}"
    (damaged,) = [p for p in (backup_dir / "objects").rglob("*.safetensors")]
    damaged.write_bytes(b"x" + damaged.read_bytes()[1:])
    bad = _run("restore", backup_dir, fresh_database)
    assert bad.returncode == 1 and "adapter_model.safetensors is missing or damaged" in bad.stderr
    assert _rows_count(fresh_database) == 0  # nothing restored


def _rows_count(dbname: str) -> int:
    with psycopg.connect(_url(dbname)) as conn:
        row = conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema NOT IN "
            "('pg_catalog', 'information_schema')"
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_the_database_url_is_percent_decoded():
    from deploy import backup

    dsn, env = backup.pg_target("postgres://us%40er:p%40ss%3Aw%2Frd%25@db.example:5433/otk?sslmode=require")
    assert dsn == "postgresql://db.example:5433/otk?sslmode=require"  # nothing secret on a command line
    assert (env["PGUSER"], env["PGPASSWORD"]) == ("us@er", "p@ss:w/rd%")

    for bad in ("", "/etc/passwd", "a//b", "a/./b", "a/../../x", "..", "a/", "."):
        with pytest.raises(backup.BackupError, match="cannot be a file name"):
            backup.check_rel(bad)
    assert backup.check_rel("orgs/1/ckpt/a..b/.x") == "orgs/1/ckpt/a..b/.x"


def test_s3_folder_markers_are_skipped_and_unsafe_keys_refused(acme, s3_store, tmp_path):
    """Keys the platform never writes but a console or a hostile tenant of the bucket could."""
    _make_history(acme)
    s3_store.client.put_object(Bucket=s3_store.bucket, Key="store/orgs/", Body=b"")  # a folder marker
    source = connection.settings_dict["NAME"]
    done = _run("backup", tmp_path / "ok", source)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "ok" / "manifest.json").read_text())
    assert len(manifest["objects"]) == 2 and not [r for r in manifest["objects"] if r.endswith("/")]

    s3_store.client.put_object(Bucket=s3_store.bucket, Key="store/a/../../../escaped", Body=b"x")
    refused = _run("backup", tmp_path / "bad", source)
    assert refused.returncode == 1
    assert "object name 'a/../../../escaped' cannot be a file name" in refused.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"]  # no partial backup, nothing outside


def test_a_manifest_naming_a_path_outside_the_backup_is_refused(acme, settings, tmp_path, fresh_database):
    settings.OBJECT_STORE_URL = f"file://{tmp_path / 'store'}"
    settings.S3_ENDPOINT_URL = None
    _make_history(acme)
    backup_dir = tmp_path / "backup"
    assert _run("backup", backup_dir, connection.settings_dict["NAME"]).returncode == 0
    shutil.rmtree(tmp_path / "store")
    (tmp_path / "secret").write_bytes(b"s")
    manifest = json.loads((backup_dir / "manifest.json").read_text())
    manifest["objects"]["../../secret"] = {"size": 1, "sha256": hashlib.sha256(b"s").hexdigest()}
    (backup_dir / "manifest.json").write_text(json.dumps(manifest))
    bad = _run("restore", backup_dir, fresh_database)
    assert bad.returncode == 1 and "object name '../../secret' cannot be a file name" in bad.stderr
    assert _rows_count(fresh_database) == 0 and not (tmp_path / "store").exists()
