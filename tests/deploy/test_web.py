"""deploy/web.py, the production web server: uvicorn workers sharing nothing but PostgreSQL and Valkey, each
with a pool of database connections, serve the API; every worker refuses a revoked token within seconds."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
from django.conf import settings
from django.utils import timezone

from bench.api_load import connections_per_process
from deploy.web import command, environment
from portal.models import ApiToken
from tests.uvicorn_ready import wait_listening
from tests.workers.test_local_driver import wait_for

BASE = Path(__file__).resolve().parents[2]


def test_environment_sets_a_pool_and_empties_the_metrics_directory(tmp_path):
    stale = tmp_path / "prom" / "counter_123.db"
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    env = environment({"PROMETHEUS_MULTIPROC_DIR": str(stale.parent)})
    assert env["DB_POOL_MAX_SIZE"] == "8" and env["DB_CONN_MAX_AGE"] == "0"
    assert env["API_AUTH_CACHE_SECONDS"] == "2"
    assert stale.parent.is_dir() and not stale.exists()
    assert environment({"DB_POOL_MAX_SIZE": "20"})["DB_POOL_MAX_SIZE"] == "20"  # the operator's value wins


def _database_url() -> str:
    db = settings.DATABASES["default"]  # the test database, so the server sees the tokens made here
    return f"postgres://{db['USER']}:{db['PASSWORD']}@{db['HOST']}:{db['PORT']}/{db['NAME']}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.django_db(transaction=True)
def test_production_server_serves_the_api_and_honours_revocation(alice, acme, make_token, tmp_path):
    secret = make_token(alice, acme)
    port = _free_port()
    env = {
        **os.environ,
        "DATABASE_URL": _database_url(),
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom"),
        # The wait for the revocation below asks as fast as the server answers: no rate limit in the way.
        "API_RATE_LIMIT": "100000/min",
    }
    log = (tmp_path / "server.log").open("wb")
    server = subprocess.Popen(
        command("127.0.0.1", port, 2, log_level="info"),
        cwd=BASE,
        env=environment(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_listening(server, sink=log, workers=2, port=port)
        headers = {"Authorization": f"Bearer {secret}"}
        # New connections each time: the requests spread over both workers and reuse their pools.
        for _ in range(6):
            assert httpx.get(f"{base}/api/v1/jobs?limit=20", headers=headers, timeout=60).status_code == 200
        # Revoked behind the workers' backs (update() sends no signal): each worker refuses the token once its
        # API_AUTH_CACHE_SECONDS entry (2 s) ends. Done when 6 requests in a row are refused (each waits for
        # the server's answer); the deadline only bounds a broken server.
        ApiToken.objects.filter(user=alice).update(revoked_at=timezone.now())
        deadline, refused = time.monotonic() + 60, 0
        while refused < 6:
            assert time.monotonic() < deadline, "the revoked token is still accepted"
            r = httpx.get(f"{base}/api/v1/jobs?limit=20", headers=headers, timeout=10)
            assert r.status_code in (200, 401)
            refused = refused + 1 if r.status_code == 401 else 0
    finally:
        server.terminate()
        server.wait(30)
        log.close()


def _start(tmp_path, workers: int, **extra: str) -> tuple[subprocess.Popen[bytes], int]:
    port = _free_port()
    env = {**os.environ, "DATABASE_URL": _database_url(), "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom")}
    server = subprocess.Popen(
        command("127.0.0.1", port, workers, log_level="info"),
        cwd=BASE,
        env=environment({**env, **extra}),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    return server, port


def _stop(server: subprocess.Popen[bytes]) -> int:
    server.terminate()
    return server.wait(60)


def _workers(server: subprocess.Popen[bytes]) -> list[psutil.Process]:
    return psutil.Process(server.pid).children()


def _listening_sockets(server: subprocess.Popen[bytes], port: int) -> list[int]:
    """The inode of each worker's listening socket on `port` (the same one for every worker when shared)."""
    return [
        os.stat(f"/proc/{w.pid}/fd/{c.fd}").st_ino
        for w in _workers(server)
        for c in w.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    ]


@pytest.mark.django_db(transaction=True)
def test_keep_alive_clients_spread_over_the_workers(tmp_path):
    """Every worker accepts from its own SO_REUSEPORT socket, so the kernel spreads connections evenly. On
    one shared socket (uvicorn's --workers) the last worker to wake took nearly all: 97 of 100 measured."""
    server, port = _start(tmp_path, 2)
    clients = []
    try:
        wait_listening(server, sink=(tmp_path / "server.log").open("wb"), workers=2, port=port)
        for _ in range(24):  # one keep-alive connection each, kept open while counted
            client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
            clients.append(client)
            assert client.get("/healthz").status_code == 200
        assert len(set(_listening_sockets(server, port))) == 2  # a socket of its own for each worker
        per_worker = connections_per_process(server.pid, port)  # what the bench prints
        # Hashed over two sockets, fewer than 4 of 24 on one worker happens with p ~ 3e-4.
        assert len(per_worker) == 2 and sum(per_worker) == 24 and min(per_worker) >= 4, per_worker
    finally:
        for client in clients:
            client.close()
        assert _stop(server) == 0


@pytest.mark.django_db(transaction=True)
def test_a_killed_worker_is_replaced_on_its_socket_and_sigterm_stops_all(tmp_path):
    server, port = _start(tmp_path, 2)
    log = (tmp_path / "server.log").open("wb")
    try:
        wait_listening(server, sink=log, workers=2, port=port)
        first = {w.pid for w in _workers(server)}
        victim = psutil.Process(min(first))
        live_gauge = tmp_path / "prom" / f"gauge_livesum_{victim.pid}.db"  # the live-stream clients' gauge
        assert live_gauge.is_file()
        victim.kill()
        victim.wait(30)

        def replaced() -> set[int] | None:
            pids = {w.pid for w in _workers(server)} - {victim.pid}
            return pids if len(pids) == 2 else None

        now = wait_for(replaced, timeout=60, what=f"a replacement for worker {victim.pid}")
        assert now & first == first - {victim.pid}
        assert not live_gauge.exists()  # marked dead: a scrape no longer counts its streams
        # New connections land on both sockets (the new worker's too, queued while it starts): all served.
        for _ in range(12):
            assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=60).status_code == 200
        workers = _workers(server)
    finally:
        code = _stop(server)
        log.close()
    assert code == 0
    assert not [w.pid for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]
    assert b"exited with code -9: restarting it" in (tmp_path / "server.log").read_bytes()


def test_workers_that_keep_failing_at_start_stop_the_server(tmp_path):
    """A release whose application cannot load fails visibly instead of restarting its workers for ever."""
    server, _ = _start(tmp_path, 2, DJANGO_SETTINGS_MODULE="no_such_settings_module")
    output, _ = server.communicate(timeout=120)
    assert server.returncode == 1
    assert b"No module named 'no_such_settings_module'" in output
    assert b"Workers keep exiting at start (the last with code 1): stopping." in output


@pytest.mark.django_db
def test_a_worker_freezes_what_its_startup_left_out_of_the_collectors_reach():
    """A full collection otherwise walks the ~140,000 objects Django and the apps leave behind: 80-150 ms on
    2 shared cores during which every request of the worker waits (README "Performance")."""
    probe = (
        "import gc; before = gc.get_freeze_count(); import portal.asgi_split; "
        "print(before, gc.get_freeze_count(), len(gc.get_objects()))"
    )
    env = {**os.environ, "DATABASE_URL": _database_url(), "DJANGO_SETTINGS_MODULE": "portal.settings"}
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=BASE, env=env, capture_output=True, text=True, check=True
    )
    before, frozen, tracked = map(int, out.stdout.split())
    assert before == 0 and frozen > 50_000 and tracked < frozen / 2, out.stdout


def test_a_port_in_use_is_refused_even_by_another_reuseport_server(tmp_path):
    """SO_REUSEPORT lets sockets share a port: a second server (or an old release still running) must not
    silently split the traffic with the first one; it fails to start like any server on a taken port."""
    from deploy.web import listening_sockets

    first = listening_sockets("127.0.0.1", 0, 2)  # what a running deploy/web.py holds
    port = first[0].getsockname()[1]
    try:
        with pytest.raises(OSError):
            listening_sockets("127.0.0.1", port, 2)
        second = subprocess.run(
            command("127.0.0.1", port, 2), cwd=BASE, capture_output=True, text=True, timeout=120, check=False
        )
        assert second.returncode == 1 and f"Cannot listen on 127.0.0.1:{port}" in second.stderr
        assert "Address already in use" in second.stderr
    finally:
        for sock in first:
            sock.close()


@pytest.mark.django_db(transaction=True)
def test_a_worker_whose_supervisor_died_before_it_asked_to_die_with_it_exits(tmp_path):
    """PR_SET_PDEATHSIG is set by the worker itself, once its Python has started: a supervisor that dies in
    between (killed during a restart) would leave the worker serving on its own, holding the port, so that no
    new deploy/web.py can start. Here the supervisor exits right after starting the worker."""
    pid_file = tmp_path / "worker.pid"
    parent = (
        "import os, socket, sys; sys.path.insert(0, '.'); from deploy.web import Supervisor\n"
        "sock = socket.socket(); sock.bind(('127.0.0.1', 0)); sock.listen(); sock.set_inheritable(True)\n"
        "supervisor = Supervisor([sock], 'info', dict(os.environ)); supervisor.start(supervisor.workers[0])\n"
        f"open({str(pid_file)!r}, 'w').write(str(supervisor.workers[0].proc.pid)); os._exit(0)\n"
    )
    env = {**os.environ, "DATABASE_URL": _database_url()}  # a worker that would start and serve
    with (tmp_path / "worker.log").open("wb") as log:
        subprocess.run([sys.executable, "-c", parent], cwd=BASE, env=env, stdout=log, stderr=log, check=True)
    worker = psutil.Process(int(pid_file.read_text()))

    def gone() -> bool:
        try:
            return worker.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    try:
        # (Says why in worker.log; had the parent been slower to exit than the worker to start, the worker's
        # PR_SET_PDEATHSIG would have stopped it.)
        wait_for(gone, timeout=60, what="the orphaned worker to exit")
    finally:
        if not gone():
            worker.kill()


def test_on_sigterm_the_port_refuses_new_connections_while_workers_finish(tmp_path):
    """A connection the kernel queues once the workers stopped accepting is never served: it would wait for
    the graceful shutdown (up to 30 s, e.g. while a live stream is open) and then be reset. Refused at once,
    a client or proxy tries another server."""
    from deploy.web import Supervisor, listening_sockets

    sockets = listening_sockets("127.0.0.1", 0, 2)
    port = sockets[0].getsockname()[1]
    supervisor = Supervisor(sockets, "warning", dict(os.environ))
    # Workers finishing their requests: SIGTERM is ignored until the test closes their input. (A real worker
    # closes its copy of the listening socket at once; these never had one.)
    finishing = "import signal, sys\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint(flush=True)\n"
    finishing += "sys.stdin.read()"
    for worker in supervisor.workers:
        worker.proc = subprocess.Popen(
            [sys.executable, "-c", finishing], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        worker.proc.stdout.readline()
    socket.create_connection(("127.0.0.1", port), timeout=10).close()  # the kernel queues it: accepted
    stopping = threading.Thread(target=supervisor.shutdown)
    stopping.start()

    def refused() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=10).close()
        except ConnectionRefusedError:
            return True
        except ConnectionResetError:
            return False  # caught as the sockets close: the queue is reset; the next try is refused
        return False

    try:
        wait_for(refused, timeout=20, what="the port to refuse new connections")
    finally:
        for worker in supervisor.workers:
            worker.proc.stdin.close()
        stopping.join(60)
    assert not stopping.is_alive() and all(w.proc.returncode == 0 for w in supervisor.workers)


def test_the_supervisors_lines_follow_log_format_json(tmp_path):
    """With LOG_FORMAT=json every line is a JSON object (README "Logs"): the supervisor's too, and they are
    the ones an operator alerts on (a port taken, workers restarted, workers failing at start)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "LOG_FORMAT": "json"}
        out = subprocess.run(
            command("127.0.0.1", port, 2), cwd=BASE, env=env, capture_output=True, text=True, timeout=120
        )
    assert out.returncode == 1
    (line,) = out.stderr.splitlines()
    record = json.loads(line)
    assert record["level"] == "ERROR" and record["logger"] == "uvicorn.error", record
    assert record["message"].startswith(f"Cannot listen on 127.0.0.1:{port}: "), record


def test_a_server_refused_the_port_leaves_the_running_ones_metrics_alone(tmp_path):
    """The metrics directory is emptied for the workers about to start: a second deploy/web.py on the same
    host (an operator's try in the running container) must not wipe the files the running workers write."""
    prom = tmp_path / "prom"
    prom.mkdir()
    live = prom / "counter_123.db"  # a running worker's
    live.write_bytes(b"counts")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(prom)}
        out = subprocess.run(
            command("127.0.0.1", port, 2), cwd=BASE, env=env, capture_output=True, text=True, timeout=120
        )
    assert out.returncode == 1 and "Cannot listen on" in out.stderr
    assert live.read_bytes() == b"counts"


def test_a_sigterm_during_start_up_stops_the_server_before_any_worker_starts(tmp_path):
    """As a container's PID 1 a signal without a handler is dropped: the handlers come first, and a SIGTERM
    that arrives while the sockets are being opened stops the server cleanly (0), no worker started."""
    port = _free_port()
    probe = (
        "import os, signal, sys; sys.path.insert(0, '.'); from deploy import web\n"
        "real = web.listening_sockets\n"
        "def opening(*args):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)  # delivered before the supervisor exists\n"
        "    return real(*args)\n"
        "web.listening_sockets = opening\n"
        f"args = ['--host', '127.0.0.1', '--port', '{port}', '--workers', '2', '--log-level', 'info']\n"
        "sys.exit(web.main(args))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=BASE, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "Received SIGTERM, stopping the workers." in done.stderr
    assert "Started server process" not in done.stderr


@pytest.mark.django_db(transaction=True)
def test_a_hung_worker_is_killed_and_replaced(tmp_path):
    """A worker whose event loop stops beating (here: stopped) is killed and restarted on its socket, as
    uvicorn's own supervisor did; its socket's connections would otherwise wait on it for ever."""
    server, port = _start(tmp_path, 2, WEB_WORKER_TIMEOUT="2")
    log = (tmp_path / "server.log").open("wb")
    try:
        wait_listening(server, sink=log, workers=2, port=port)
        first = {w.pid for w in _workers(server)}
        hung = psutil.Process(min(first))
        hung.suspend()  # SIGSTOP: alive, silent

        def replaced() -> set[int] | None:
            pids = {w.pid for w in _workers(server) if w.status() != psutil.STATUS_ZOMBIE}
            return pids if hung.pid not in pids and len(pids) == 2 else None

        wait_for(replaced, timeout=120, what=f"worker {hung.pid} killed and replaced")
        for _ in range(12):  # the new worker's socket included
            assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=60).status_code == 200
    finally:
        assert _stop(server) == 0
        log.close()
    assert (
        f"Worker [{hung.pid}] has been silent for 2 s: killing it.".encode()
        in (tmp_path / "server.log").read_bytes()
    )


@pytest.mark.django_db(transaction=True)
def test_sighup_replaces_every_worker_without_a_failed_request(tmp_path):
    """A reload (the code and settings on disk now): each new worker serves before its old one stops, so the
    requests made meanwhile, each on a new connection, all succeed."""
    server, port = _start(tmp_path, 2)
    log = (tmp_path / "server.log").open("wb")
    try:
        wait_listening(server, sink=log, workers=2, port=port)
        first = {w.pid for w in _workers(server)}
        server.send_signal(signal.SIGHUP)
        answers = []

        def replaced() -> bool:
            answers.append(httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=60).status_code)
            pids = {w.pid for w in _workers(server) if w.status() != psutil.STATUS_ZOMBIE}
            return len(pids) == 2 and not pids & first

        wait_for(replaced, timeout=120, what="both workers replaced")
        assert answers and set(answers) == {200}, answers
    finally:
        assert _stop(server) == 0
        log.close()
    text = (tmp_path / "server.log").read_bytes()
    assert text.count(b"replaced by") == 2 and b"exited with code" not in text
