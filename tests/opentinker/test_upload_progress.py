"""Upload progress (`opentinker envs push`): the SDK reports every byte of the multipart body as it is sent,
and the body the server gets is unchanged. Against a MockTransport; the live push is tests/opentinker/
test_envs_cli.py."""

from __future__ import annotations

from pathlib import Path

import httpx

from opentinker.client import Client

from .test_client_unit import BASE, TOKEN
from .test_envs_cli import make_package_dir


def test_push_reports_each_chunk_of_the_whole_body(tmp_path: Path) -> None:
    received: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        received.append(request.read())
        return httpx.Response(201, json={"owner": "acme", "name": "echo", "versions": []})

    pkg = make_package_dir(tmp_path / "pkg")
    (pkg / "big.bin").write_bytes(bytes(range(256)) * 2048)  # 512 KiB, incompressible enough to span chunks
    calls: list[tuple[int, int]] = []

    with Client(BASE, TOKEN, transport=httpx.MockTransport(handler)) as client:
        client.envs.push(pkg, on_bytes=lambda n, total: calls.append((n, total)))
    (body,) = received
    assert calls and sum(n for n, _ in calls) == len(body)
    assert {total for _, total in calls} == {len(body)}
