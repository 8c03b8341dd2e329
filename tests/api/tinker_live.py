"""Shared pieces of the live Tinker tests: the platform (ASGI app on a loopback port) and a model server
process (`python -m gpu_runtime.model_server serve`) on the same Valkey. Import the fixtures into a test
module to use them."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from django.conf import settings
from django.core.asgi import get_asgi_application
from tinker import types

from api.tinker import queue
from api.tinker.server_tokens import model_server_token_issue
from gpu_runtime.model_server.serve import lease_key
from tests.loopback_asgi import serving

BASE = Path(__file__).resolve().parents[2]
BASE_MODEL = "tiny-qwen2"
WAIT = 240  # seconds, only against a hang: the model server's start and a handful of steps on a loaded box


def datum(tokens: list[int]) -> types.Datum:
    """A next-token datum: every token after the first is a target of weight 1."""
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )


def post(url: str, key: str, endpoint: str, body: dict) -> httpx.Response:
    """One raw call of the SDK's API, as the SDK would send it."""
    return httpx.post(f"{url}/tinker/api/v1/{endpoint}", json=body, headers={"X-API-Key": key}, timeout=60)


def settled(url: str, key: str, request_id: str) -> dict:
    """retrieve_future until it is no longer `try_again` (each poll is held open server-side)."""
    for _ in range(WAIT // 10 + 1):
        answer = post(url, key, "retrieve_future", {"request_id": request_id}).json()
        if answer.get("type") != "try_again":
            return answer
    raise AssertionError(f"{request_id} still pending")


def clear_queues(base_model: str = BASE_MODEL) -> None:
    """Nothing left over from an earlier run: the operations list, what a dead server had claimed, and its
    one-server lease (it lapses only after its TTL)."""
    queue.client().delete(queue.ops_key(base_model), queue.claimed_key(base_model), lease_key(base_model))


def lease_lapses(base_model: str = BASE_MODEL) -> None:
    """What the TTL does to a killed server's lease, without waiting for it."""
    queue.client().delete(lease_key(base_model))


def start_model_server(
    platform_url: str, base_model: str = BASE_MODEL, extra: tuple[str, ...] = (), stderr: int | None = None
) -> subprocess.Popen:
    env = {
        "PATH": "/usr/bin:/bin",
        "OPENTINKER_MODEL_SERVER_TOKEN": model_server_token_issue(base_model),
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.Popen(
        [
            *(sys.executable, "-m", "gpu_runtime.model_server", "serve", "--base-model", base_model),
            *("--queue-url", settings.REDIS_URL, "--ingest-url", f"{platform_url}/tinker/ingest/outcomes"),
            *extra,
        ],
        cwd=BASE,
        env=env,
        stderr=stderr,
        text=True,
    )


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM: the server finishes what runs, parks its training clients, and exits 0. WAIT is only a hang
    guard (parking writes each adapter and its Adam state: seconds on a loaded box), then SIGKILL."""
    proc.terminate()
    try:
        proc.wait(WAIT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture
def platform(settings, tmp_path, monkeypatch) -> Iterator[str]:
    settings.OBJECT_STORE_URL = f"file://{tmp_path}/objects"
    settings.TINKER_POLL_HOLD_SECONDS = 10
    settings.OPENTINKER_TINKER_AUTOSTART = False  # these tests start their model servers by hand
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    clear_queues()
    with serving(get_asgi_application()) as url:
        yield url


@pytest.fixture
def model_server(platform) -> Iterator[subprocess.Popen]:
    proc = start_model_server(platform)
    yield proc
    stop(proc)
