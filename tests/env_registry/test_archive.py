"""Package archives: manifest rules and hostile uploads, each refused with a clear message."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from env_registry.archive import (
    MAX_UNPACKED_BYTES,
    ArchiveError,
    extract_archive,
    inspect_archive,
    manifest_parse,
    read_capped,
)
from opentinker.env.codec import ByteCodec
from opentinker.env.protocol import SingleTurnProtocol, StopReason
from opentinker.env.sandbox import SandboxedEnvironment, SandboxLimits
from tests.opentinker.env.scripted import Scripted

MANIFEST = {
    "name": "echo",
    "version": "1.2.3",
    "entrypoint": "echo_env:Echo",
    "protocol": "single-turn",
    "description": "echoes",
    "tags": ["demo"],
    "license": "MIT",
}
SOURCE = """
from opentinker.env import Environment, Observation, StepResult
class Echo(Environment):
    def reset(self, seed):
        return Observation(f"say {seed}")
    def step(self, action):
        return StepResult(None, 1.0 if action == "say 4" else 0.0, True)
"""


def make_tar(files: dict[str, bytes], extra=None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if extra:
            extra(tar)
    return buf.getvalue()


def good_files(**overrides) -> dict[str, bytes]:
    files = {
        "opentinker.json": json.dumps(MANIFEST).encode(),
        "echo_env.py": SOURCE.encode(),
        "README.md": b"# Echo\nSays things.",
    }
    files.update(overrides)
    return files


def test_valid_package_inspects_extracts_and_runs_a_smoke_episode_in_the_sandbox(tmp_path):
    data = make_tar(good_files())
    pkg = inspect_archive(data)
    assert pkg.manifest.entrypoint == "echo_env:Echo" and pkg.manifest.roles == ["agent"]
    assert pkg.readme.startswith("# Echo") and pkg.files == ["README.md", "echo_env.py", "opentinker.json"]
    extract_archive(data, tmp_path / "pkg")
    env = SandboxedEnvironment(pkg.manifest.entrypoint, package_dir=tmp_path / "pkg", limits=SandboxLimits())
    try:
        ep = SingleTurnProtocol().run(env, Scripted(["say 4"]), ByteCodec(), seed=4)
    finally:
        env.close()
    assert ep.stop_reason is StopReason.DONE and ep.reward == 1.0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"version": "1.2"}, "version must be semver"),
        ({"entrypoint": "os.system"}, "entrypoint must be `module.path:ClassName`"),
        ({"protocol": "telepathy"}, "protocol"),
        ({"name": "../evil"}, "name"),
        ({"tags": ["Not A Tag"]}, "tags are"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_manifest_rules(change, message):
    with pytest.raises(ArchiveError, match=message):
        manifest_parse({**MANIFEST, **change})


def test_manifest_that_lies_about_its_entrypoint():
    files = good_files(**{"opentinker.json": json.dumps({**MANIFEST, "entrypoint": "nowhere:Echo"}).encode()})
    with pytest.raises(ArchiveError, match="entrypoint module nowhere is not in the archive"):
        inspect_archive(make_tar(files))


def test_missing_manifest_and_garbage():
    with pytest.raises(ArchiveError, match=r"no opentinker\.json"):
        inspect_archive(make_tar({"x.py": b""}))
    with pytest.raises(ArchiveError, match=r"not a readable \.tar\.gz"):
        inspect_archive(b"definitely not gzip")


def test_dotdot_and_absolute_paths_are_refused(tmp_path):
    for name in ("../escape.py", "/etc/cron.d/x", "a/../../b"):
        with pytest.raises(ArchiveError, match="points outside the package"):
            extract_archive(make_tar(good_files(**{name: b"x"})), tmp_path / "out")
    assert not (tmp_path / "escape.py").exists()


def test_symlink_out_is_refused(tmp_path):
    def link(tar):
        info = tarfile.TarInfo("sneaky")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)

    with pytest.raises(ArchiveError, match="'sneaky' is a link"):
        extract_archive(make_tar(good_files(), extra=link), tmp_path / "out")
    assert not (tmp_path / "out" / "sneaky").exists()


def test_zip_bomb_is_refused_without_unpacking():
    def bomb(tar):
        info = tarfile.TarInfo("zeros.bin")
        info.size = MAX_UNPACKED_BYTES + 1

        class Zeros(io.RawIOBase):
            def readable(self):
                return True

            def readinto(self, b):
                b[:] = bytes(len(b))
                return len(b)

        tar.addfile(info, io.BufferedReader(Zeros()))

    data = make_tar(good_files(), extra=bomb)
    assert len(data) < 1024 * 1024  # a small upload...
    with pytest.raises(ArchiveError, match="unpacks to over 100 MB"):  # ...that would unpack to 100 MB
        inspect_archive(data)


def test_upload_over_the_size_limit_is_refused_while_streaming():
    read = []

    def chunks():
        for _ in range(100):
            read.append(1)
            yield b"x" * 1024 * 1024

    with pytest.raises(ArchiveError, match="over the 5 MB limit"):
        read_capped(chunks(), limit=5 * 1024 * 1024)
    assert len(read) == 6  # stopped at the first chunk past the limit
    data, sha = read_capped([b"ab", b"c"])
    assert data == b"abc" and sha == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
