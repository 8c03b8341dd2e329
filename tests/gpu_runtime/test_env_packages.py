"""Registry packages in the runtime: sandboxed instances, failures that fail episodes (not the job), the
pinned archive fetched with the job token and refused on a sha256 mismatch, a local package directory."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import tarfile
import threading
from pathlib import Path

import pytest

from gpu_runtime import env_packages
from gpu_runtime.controller import EXIT_OK, Controller, LocalGroup, derive_seed
from gpu_runtime.env_packages import EnvPackageError, job_package, local_package
from gpu_runtime.envs import env_factory, protocol_kind
from opentinker.env.remote import RemoteEnvironmentError
from opentinker.env.sandbox import SandboxedEnvironment
from opentinker.spec import EnvironmentSpec
from tests.gpu_runtime.conftest import small_spec
from tests.gpu_runtime.test_controller import ListSink

# A trivial custom environment: reward 1 when the answer has an even byte sum. `config.fail` maps a seed to
# "raise" or "hang", so a test picks exactly which episodes break and how.
FLAKY_SOURCE = """
import time
from opentinker.env.base import Environment, Observation, StepResult


class Flaky(Environment):
    name = "flaky"
    system_prompt = "Answer anything."

    def __init__(self, fail=None, **config):
        super().__init__(**config)
        self.fail = fail or {}
        self.seed = None

    def reset(self, seed):
        self.seed = seed
        return Observation(f"Say something about {seed}")

    def step(self, action):
        how = self.fail.get(str(self.seed))
        if how == "raise":
            raise RuntimeError(f"flaky broke on seed {self.seed}")
        if how == "hang":
            time.sleep(3600)
        return StepResult(None, float(sum(action.encode()) % 2 == 0), True)
"""
MANIFEST = {"name": "flaky", "version": "1.0.0", "entrypoint": "flaky_env:Flaky", "protocol": "single-turn"}


def write_package(directory: Path, source: str = FLAKY_SOURCE, manifest: dict | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "opentinker.json").write_text(json.dumps(manifest or MANIFEST))
    (directory / "flaky_env.py").write_text(source)
    return directory


def package_archive(directory: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(directory.iterdir()):
            tar.add(path, arcname=path.name)
    return buf.getvalue()


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch):
    monkeypatch.setattr(env_packages, "_unpacked", {})
    monkeypatch.setattr(env_packages, "_factories", {})
    for var in ("OPENTINKER_ENV_PACKAGE", "OPENTINKER_INGEST_URL", "OPENTINKER_JOB_TOKEN"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.slow
def test_package_failures_fail_their_episodes_and_the_job_completes(tmp_path, monkeypatch, capfd):
    """Step 1: one prompt's step raises; step 2: one prompt's step hangs past the call timeout. Each fails
    exactly that group's 2 episodes with its reason, the other group trains, the job succeeds."""
    write_package(tmp_path / "pkg")
    monkeypatch.setenv("OPENTINKER_ENV_PACKAGE", str(tmp_path / "pkg"))
    monkeypatch.setenv("OPENTINKER_SANDBOX_CALL_TIMEOUT_S", "4")
    spec = small_spec(steps=2)
    broken = {str(derive_seed(spec.seed, 1, 0)): "raise", str(derive_seed(spec.seed, 2, 0)): "hang"}
    spec = spec.model_copy(
        update={"environment": EnvironmentSpec(ref="acme/flaky@1.0.0", config={"fail": broken})}
    )
    sink = ListSink()
    result = Controller(spec, sink, LocalGroup(spec), f"file://{tmp_path}/ck").run()

    assert result.exit_code == EXIT_OK
    steps = sink.metric_steps()
    assert sorted(steps) == [1, 2]
    assert [steps[s]["episodes/failed"] for s in (1, 2)] == [2.0, 2.0]
    assert all(0.0 <= steps[s]["reward/mean"] <= 1.0 for s in (1, 2))
    failures = [line for line in capfd.readouterr().err.splitlines() if line.startswith("episode failed")]
    assert failures == [
        "episode failed: step failed: SandboxError: step raised RuntimeError: flaky broke on seed "
        f"{derive_seed(spec.seed, 1, 0)}",
        "episode failed: step failed: SandboxError: step timed out after 4s",
    ]


def test_local_package_directory_runs_sandboxed(tmp_path, monkeypatch):
    write_package(tmp_path / "pkg")
    monkeypatch.setenv("OPENTINKER_ENV_PACKAGE", str(tmp_path / "pkg"))
    make_env = env_factory(EnvironmentSpec(ref="acme/flaky@1.0.0"))
    assert protocol_kind(make_env) == "single-turn"
    env = make_env()
    try:
        assert isinstance(env, SandboxedEnvironment) and env.sandbox.proc.pid > 0
        assert env.reset(7).text == "Say something about 7"
        assert env.step("ab").reward == 0.0 and env.step("aa").reward == 1.0  # 97+98 odd, 97+97 even
    finally:
        env.close()


def test_local_package_errors_are_clear(tmp_path):
    with pytest.raises(EnvPackageError, match="does not exist"):
        local_package(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EnvPackageError, match=r"has no opentinker\.json"):
        local_package(tmp_path / "empty")
    write_package(tmp_path / "lies", manifest={**MANIFEST, "entrypoint": "missing:Flaky"})
    with pytest.raises(EnvPackageError, match="entrypoint module missing is not in"):
        local_package(tmp_path / "lies")


class _Ingest(http.server.BaseHTTPRequestHandler):
    """A stand-in for the platform's ingest endpoint (the real one: tests/api/test_ingest_env.py)."""

    archive = b""
    seen: list[tuple[str, str]] = []

    def do_GET(self):
        type(self).seen.append((self.path, self.headers.get("Authorization", "")))
        self.send_response(200)
        self.send_header("Content-Type", "application/gzip")
        self.end_headers()
        self.wfile.write(self.archive)

    def log_message(self, *args):
        pass


@pytest.fixture
def ingest_server(monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Ingest)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Ingest.seen = []
    monkeypatch.setenv(
        "OPENTINKER_INGEST_URL", f"http://127.0.0.1:{server.server_port}/api/v1/ingest/jobs/j1"
    )
    monkeypatch.setenv("OPENTINKER_JOB_TOKEN", "otj_test")
    yield _Ingest
    server.shutdown()


def test_pinned_archive_is_fetched_with_the_job_token_and_checked(tmp_path, ingest_server):
    data = package_archive(write_package(tmp_path / "pkg"))
    ingest_server.archive = data
    good = hashlib.sha256(data).hexdigest()

    with pytest.raises(
        EnvPackageError, match=f"sha256 mismatch: the job is pinned to {'0' * 64}, the archive is {good}"
    ):
        job_package(EnvironmentSpec(ref="acme/flaky@1.0.0", sha256="0" * 64))

    package = job_package(EnvironmentSpec(ref="acme/flaky@1.0.0", sha256=good))
    assert package.manifest.entrypoint == "flaky_env:Flaky"
    assert (package.directory / "flaky_env.py").read_text() == FLAKY_SOURCE
    assert job_package(EnvironmentSpec(ref="acme/flaky@1.0.0", sha256=good)) is package  # fetched once
    assert ingest_server.seen == [("/api/v1/ingest/jobs/j1/environment", "Bearer otj_test")] * 2


def test_unpinned_or_unreachable_package_is_refused(tmp_path, monkeypatch):
    with pytest.raises(EnvPackageError, match="is not pinned"):
        job_package(EnvironmentSpec(ref="acme/flaky@1.0.0"))
    with pytest.raises(EnvPackageError, match="OPENTINKER_INGEST_URL and OPENTINKER_JOB_TOKEN are not set"):
        job_package(EnvironmentSpec(ref="acme/flaky@1.0.0", sha256="a" * 64))


def test_hostile_archive_is_refused_before_anything_runs(tmp_path, ingest_server):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("../escape.py")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    ingest_server.archive = buf.getvalue()
    sha = hashlib.sha256(buf.getvalue()).hexdigest()
    with pytest.raises(EnvPackageError, match="points outside the package"):
        job_package(EnvironmentSpec(ref="acme/flaky@1.0.0", sha256=sha))
    assert not (tmp_path.parent / "escape.py").exists()


# --- remote environments: a job against a real OpenEnv server ---


class _RequireBearer:
    """ASGI wrapper in front of the OpenEnv app: refuses HTTP and WebSocket without the owner's secret and
    records what it saw, so the test shows the secret reached the server (and only as a header)."""

    def __init__(self, app, secret: str) -> None:
        self.app, self.secret, self.seen = app, secret, []

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            auth = dict(scope["headers"]).get(b"authorization", b"").decode()
            self.seen.append((scope["type"], auth == f"Bearer {self.secret}"))
            if auth != f"Bearer {self.secret}":
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 4401})
                    return
                await send({"type": "http.response.start", "status": 401, "headers": []})
                await send({"type": "http.response.body", "body": b"no"})
                return
        await self.app(scope, receive, send)


@pytest.fixture
def openenv_server(monkeypatch):
    from tests.opentinker.env.test_remote_openenv import CountAction, serve

    guard: list[_RequireBearer] = []

    def wrap(app):
        guard.append(_RequireBearer(app, "s3cret"))
        return guard[0]

    for url in serve(CountAction, max_concurrent_envs=8, wrap=wrap):  # stops the server when the test ends
        # A loopback server: the runtime's egress policy admits it only through an allow-list (as a platform
        # admin would set for a private environment server), for this one port.
        monkeypatch.setenv("OPENTINKER_EGRESS_ALLOW", url.removeprefix("http://"))
        yield url, guard[0]


@pytest.mark.slow
def test_a_job_runs_a_remote_openenv_environment_with_its_secret(tmp_path, monkeypatch, openenv_server):
    url, app = openenv_server
    monkeypatch.setenv("OPENTINKER_ENV_SECRET", "s3cret")  # how the launcher hands it over: never in the spec
    spec = small_spec(steps=2).model_copy(update={"environment": EnvironmentSpec(ref=url)})
    make_env = env_factory(spec.environment)
    assert protocol_kind(make_env) == "multi-turn"

    sink = ListSink()
    result = Controller(spec, sink, LocalGroup(spec), f"file://{tmp_path}/ck").run()
    assert result.exit_code == EXIT_OK
    steps = sink.metric_steps()
    assert [steps[s]["episodes/failed"] for s in (1, 2)] == [0.0, 0.0]
    # 2 steps x 4 episodes, each over its own WebSocket session, all with the secret.
    assert sum(kind == "websocket" for kind, _ in app.seen) == 8
    assert all(ok for _, ok in app.seen)
    assert "s3cret" not in json.dumps(spec.model_dump(mode="json")) + json.dumps(sink.records)


def test_a_remote_environment_without_its_secret_is_refused_clearly(openenv_server):
    url, app = openenv_server
    env = env_factory(EnvironmentSpec(ref=url, config={"retries": 0}))()
    try:
        with pytest.raises(RemoteEnvironmentError, match="refused the session: HTTP 403"):
            env.reset(3)
    finally:
        env.close()
    assert app.seen and not any(ok for _, ok in app.seen)
