"""`opentinker envs push/show/star/fork` and the SDK's envs methods against the real API server.

Actors: alice (owner of acme), bob (member of acme), charlie (outsider, owner of globex).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from env_registry.models import EnvironmentVersion
from opentinker import errors
from opentinker.cli import main
from opentinker.client import Client, pack_environment

SOURCE = """
from opentinker.env import Environment, Observation, StepResult
class Echo(Environment):
    def reset(self, seed):
        return Observation(f"say {seed}")
    def step(self, action):
        return StepResult(None, 1.0, True)
"""
MANIFEST = {
    "name": "echo",
    "version": "0.1.0",
    "entrypoint": "echo_env:Echo",
    "protocol": "single-turn",
    "description": "Echoes",
    "tags": ["demo"],
}


def make_package_dir(root: Path, manifest_file: str = "opentinker.json", **changes) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / manifest_file).write_text(json.dumps({**MANIFEST, **changes}))
    (root / "echo_env.py").write_text(SOURCE)
    (root / "README.md").write_text("# Echo\n")
    return root


def members(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


# ----------------------------------------------------------------------------------------------------
# Packing (no server)


def test_pack_uses_the_manifest_and_skips_junk(tmp_path):
    d = make_package_dir(tmp_path / "pkg", manifest_file="manifest.json")
    (d / "__pycache__").mkdir()
    (d / "__pycache__" / "echo_env.cpython-311.pyc").write_bytes(b"junk")
    (d / ".git").mkdir()
    (d / ".git" / "HEAD").write_text("ref")
    (d / ".env").write_text("SECRET=1")
    (d / "lib").mkdir()
    (d / "lib" / "util.py").write_text("X = 1\n")
    os.symlink("/etc/passwd", d / "passwd")
    data = pack_environment(d)
    files = members(data)
    assert sorted(files) == ["README.md", "echo_env.py", "lib/util.py", "opentinker.json"]
    assert json.loads(files["opentinker.json"])["name"] == "echo"
    # Deterministic: the same directory packs to the same bytes.
    assert pack_environment(d) == data


def test_pack_refuses_a_directory_without_a_manifest(tmp_path):
    (tmp_path / "x.py").write_text("")
    with pytest.raises(errors.ValidationError, match=r"has no opentinker\.json or manifest\.json"):
        pack_environment(tmp_path)
    (tmp_path / "opentinker.json").write_text("{nope")
    with pytest.raises(errors.ValidationError, match="is not valid JSON"):
        pack_environment(tmp_path)
    with pytest.raises(errors.ValidationError, match="is not a directory"):
        pack_environment(tmp_path / "missing")


# ----------------------------------------------------------------------------------------------------
# Against the live server


@pytest.fixture
def tokens(live_server, alice, bob, charlie, acme, globex, make_token, settings, tmp_path, monkeypatch):
    settings.OBJECT_STORE_URL = f"file://{tmp_path / 'objects'}"
    monkeypatch.setenv("OPENTINKER_URL", live_server.url)
    monkeypatch.setenv("OPENTINKER_CONFIG", str(tmp_path / "no-config.json"))
    return {
        "alice": make_token(alice, acme),
        "bob": make_token(bob, acme),
        "charlie": make_token(charlie, globex),
    }


def cli(monkeypatch, token: str, *argv: str) -> int:
    monkeypatch.setenv("OPENTINKER_TOKEN", token)
    return main(list(argv))


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("builtin_envs")
def test_cli_push_show_star_fork(tokens, monkeypatch, tmp_path, capsys, live_server):
    pkg = make_package_dir(tmp_path / "echo")
    assert cli(monkeypatch, tokens["alice"], "envs", "push", str(pkg)) == 0
    assert capsys.readouterr().out.strip() == "published acme/echo@0.1.0: valid"
    assert EnvironmentVersion.objects.get(package__name="echo").status == "valid"

    # A private package is its publisher's and the admins': bob, a plain member, cannot even see it.
    assert cli(monkeypatch, tokens["bob"], "envs", "push", str(pkg)) == 1
    assert "no environment acme/echo you may publish to" in capsys.readouterr().err

    # The same version again: 409, exit 1, nothing changed.
    assert cli(monkeypatch, tokens["alice"], "envs", "push", str(pkg)) == 1
    assert "already exists; versions are immutable" in capsys.readouterr().err

    # A broken version is published but invalid: exit 1 with the reason.
    (pkg / "echo_env.py").write_text("raise SystemExit('nope')\n")
    (pkg / "opentinker.json").write_text(json.dumps({**MANIFEST, "version": "0.2.0"}))
    assert cli(monkeypatch, tokens["alice"], "envs", "push", str(pkg), "--visibility", "public") == 1
    captured = capsys.readouterr()
    assert captured.out.strip() == "published acme/echo@0.2.0: invalid"
    assert "failed validation: loading echo_env:Echo failed: SystemExit: nope" in captured.err

    assert cli(monkeypatch, tokens["charlie"], "envs", "show", "acme/echo", "--json") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["latest_version"] == "0.1.0" and shown["visibility"] == "public"
    assert [(v["version"], v["status"]) for v in shown["versions"]] == [
        ("0.2.0", "invalid"),
        ("0.1.0", "valid"),
    ]

    assert cli(monkeypatch, tokens["charlie"], "envs", "show", "acme/echo") == 0
    out = capsys.readouterr().out
    assert "environment:" in out and "acme/echo" in out and "0.2.0" in out and "invalid" in out

    assert cli(monkeypatch, tokens["charlie"], "envs", "star", "acme/echo") == 0
    assert capsys.readouterr().out.strip() == "starred acme/echo (1 stars)"
    assert cli(monkeypatch, tokens["charlie"], "envs", "fork", "acme/echo", "--name", "my-echo") == 0
    assert capsys.readouterr().out.strip() == "forked acme/echo into globex/my-echo (private)"
    assert cli(monkeypatch, tokens["charlie"], "envs", "star", "acme/echo", "--remove") == 0
    assert capsys.readouterr().out.strip() == "unstarred acme/echo (0 stars)"

    assert cli(monkeypatch, tokens["charlie"], "envs", "list", "--sort", "stars", "-q", "echo") == 0
    assert "globex/my-echo" in capsys.readouterr().out

    assert cli(monkeypatch, tokens["charlie"], "envs", "show", "acme") == 2
    assert "expected OWNER/NAME" in capsys.readouterr().err


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("builtin_envs")
def test_sdk_envs_push_get_update_and_outsider(tokens, tmp_path, live_server):
    pkg = make_package_dir(tmp_path / "echo", version="1.0.0")
    with (
        Client(live_server.url, tokens["alice"]) as alice,
        Client(live_server.url, tokens["bob"]) as bob,
        Client(live_server.url, tokens["charlie"]) as charlie,
    ):
        env = bob.envs.push(pkg, visibility="organization")
        assert (env.owner, env.name, env.visibility) == ("acme", "echo", "organization")
        assert env.version_info()["status"] == "valid"
        assert (
            env.version_info("1.0.0")["sha256"] == EnvironmentVersion.objects.get(package__name="echo").sha256
        )
        with pytest.raises(errors.NotFound):
            charlie.envs.get("acme", "echo")
        with pytest.raises(errors.NotFound):
            charlie.envs.star("acme", "echo")
        with pytest.raises(errors.NotFound):
            charlie.envs.fork("acme", "echo")
        assert bob.envs.star("acme", "echo") == 1
        # Settings are the organization admins' (bob published it, but is a member).
        with pytest.raises(errors.PermissionDenied):
            bob.envs.update("acme", "echo", description="New", tags=["x"])
        updated = alice.envs.update("acme", "echo", description="New", tags=["x"])
        assert (updated.description, updated.tags, updated.stars, updated.starred) == ("New", ["x"], 1, False)
