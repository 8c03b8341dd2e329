"""Whole-checkpoint downloads against a MockTransport: which files, atomic appearance, resuming after an
interruption, sha256 checks, and the progress output on a terminal and off it."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from opentinker import errors
from opentinker.checkpoint_download import MANIFEST, download_checkpoint
from opentinker.cli import main
from opentinker.client import Client
from opentinker.progress import Progress

from .test_client_unit import BASE, TOKEN, FakeApi, ok

FILES = {
    "meta.json": b'{"step": 4}',
    "proposer/adapter_model.safetensors": b"A" * 3000,
    "proposer/trainer_state.pt": b"S" * 5000,
    "solver/model.safetensors": b"W" * 2048,
    "solver/trainer_state.pt": b"T" * 5000,
}


def listing(files: dict[str, bytes], **override: str) -> dict:
    entries = [
        {"name": n, "size": len(b), "sha256": override.get(n, hashlib.sha256(b).hexdigest())}
        for n, b in files.items()
    ]
    old = {"id": "ck1", "step": 2, "files": entries[:1]}
    return {"results": [old, {"id": "ck2", "step": 4, "files": entries}]}


@pytest.fixture
def api() -> FakeApi:
    api = FakeApi()
    api.on("GET", "/jobs/j1/checkpoints", ok(listing(FILES)))
    for name, body in FILES.items():
        api.on("GET", f"/jobs/j1/checkpoints/ck2/files/{name}", httpx.Response(200, content=body))
    return api


def test_latest_checkpoint_without_trainer_state_with_plain_progress_lines(
    api: FakeApi, tmp_path: Path
) -> None:
    out = io.StringIO()
    got = download_checkpoint(
        api.client(), "j1", tmp_path / "model", progress=Progress(0, stream=out, tty=False)
    )
    assert got.checkpoint.id == "ck2" and got.verified == 3 and got.size == 11 + 3000 + 2048
    files = sorted(
        str(p.relative_to(tmp_path / "model")) for p in (tmp_path / "model").rglob("*") if p.is_file()
    )
    assert files == ["meta.json", "proposer/adapter_model.safetensors", "solver/model.safetensors"]
    assert (tmp_path / "model" / "solver" / "model.safetensors").read_bytes() == FILES[
        "solver/model.safetensors"
    ]
    assert out.getvalue().splitlines() == [
        "meta.json  11 B  sha256 ok",
        "proposer/adapter_model.safetensors  2.9 KiB  sha256 ok",
        "solver/model.safetensors  2.0 KiB  sha256 ok",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # the partial directory was renamed, not copied


def test_interrupted_download_leaves_no_destination_and_resumes(api: FakeApi, tmp_path: Path) -> None:
    name = "solver/model.safetensors"
    api.on("GET", f"/jobs/j1/checkpoints/ck2/files/{name}", httpx.ReadError("connection reset"))
    with pytest.raises(errors.ApiConnectionError):
        download_checkpoint(api.client(), "j1", tmp_path / "model")
    assert not (tmp_path / "model").exists()
    partial = tmp_path / ".model.partial"
    assert sorted(p.name for p in partial.rglob("*") if p.is_file()) == sorted(
        [MANIFEST, "adapter_model.safetensors", "meta.json"]
    )

    api.on("GET", f"/jobs/j1/checkpoints/ck2/files/{name}", httpx.Response(200, content=FILES[name]))
    before = len(api.requests)
    out = io.StringIO()
    download_checkpoint(api.client(), "j1", tmp_path / "model", progress=Progress(0, stream=out, tty=False))
    fetched = [r.url.path.rsplit("/files/", 1)[-1] for r in api.requests[before:] if "/files/" in r.url.path]
    assert fetched == [name]  # the two verified files were kept
    assert out.getvalue().splitlines() == [
        "meta.json  11 B  already downloaded",
        "proposer/adapter_model.safetensors  2.9 KiB  already downloaded",
        "solver/model.safetensors  2.0 KiB  sha256 ok",
    ]
    assert not partial.exists() and (tmp_path / "model" / name).read_bytes() == FILES[name]


def interrupt(api: FakeApi, tmp_path: Path, name: str, **kwargs: object) -> Path:
    """A download of ck2 cut at file ``name``: the partial directory it leaves."""
    api.on("GET", f"/jobs/j1/checkpoints/ck2/files/{name}", httpx.ReadError("connection reset"))
    with pytest.raises(errors.ApiConnectionError):
        download_checkpoint(api.client(), "j1", tmp_path / "model", **kwargs)  # type: ignore[arg-type]
    api.on("GET", f"/jobs/j1/checkpoints/ck2/files/{name}", httpx.Response(200, content=FILES[name]))
    return tmp_path / ".model.partial"


def test_a_rerun_for_another_checkpoint_starts_over_instead_of_mixing(api: FakeApi, tmp_path: Path) -> None:
    """Same -o, another --step: ck2's meta.json must not stand in for ck1's (same name, other checkpoint)."""
    interrupt(api, tmp_path, "solver/model.safetensors")
    ck1 = {"meta.json": b'{"step": 2}'}
    listed = listing(FILES)
    listed["results"][0]["files"] = [
        {"name": "meta.json", "size": 11, "sha256": hashlib.sha256(ck1["meta.json"]).hexdigest()}
    ]
    api.on("GET", "/jobs/j1/checkpoints", ok(listed))
    api.on("GET", "/jobs/j1/checkpoints/ck1/files/meta.json", httpx.Response(200, content=ck1["meta.json"]))
    got = download_checkpoint(api.client(), "j1", tmp_path / "model", step=2)
    assert got.checkpoint.id == "ck1"
    files = sorted(p.relative_to(tmp_path / "model").as_posix() for p in (tmp_path / "model").rglob("*"))
    assert files == ["meta.json"]  # no ck2 adapter, no manifest
    assert (tmp_path / "model" / "meta.json").read_bytes() == ck1["meta.json"]


def test_a_rerun_with_another_file_set_starts_over_and_strays_are_removed(
    api: FakeApi, tmp_path: Path
) -> None:
    partial = interrupt(api, tmp_path, "solver/model.safetensors", with_trainer_state=True)
    assert (partial / "proposer" / "trainer_state.pt").is_file()
    before = len(api.requests)
    download_checkpoint(api.client(), "j1", tmp_path / "model")  # without --with-trainer-state now
    fetched = [r.url.path.rsplit("/files/", 1)[-1] for r in api.requests[before:] if "/files/" in r.url.path]
    assert len(fetched) == 3  # started over
    assert not list((tmp_path / "model").rglob("trainer_state.pt"))

    partial = interrupt(api, tmp_path / "again", "solver/model.safetensors")
    (partial / "proposer" / "stray.bin").write_bytes(b"x")  # e.g. a temporary file a crash left behind
    download_checkpoint(api.client(), "j1", tmp_path / "again" / "model")
    assert not (tmp_path / "again" / "model" / "proposer" / "stray.bin").exists()


def test_a_corrupt_file_is_not_kept_and_nothing_appears(api: FakeApi, tmp_path: Path) -> None:
    api.on("GET", "/jobs/j1/checkpoints", ok(listing(FILES, **{"meta.json": "0" * 64})))
    with pytest.raises(errors.OpenTinkerError, match=r"checksum mismatch for meta\.json"):
        download_checkpoint(api.client(), "j1", tmp_path / "model")
    assert not (tmp_path / "model").exists()
    assert [p.name for p in (tmp_path / ".model.partial").rglob("*")] == [MANIFEST]


@pytest.mark.parametrize("name", ["../escape", "/etc/escape", "a/../../escape", "bell\x07.bin"])
def test_a_file_name_that_climbs_out_or_holds_control_characters_is_refused(
    api: FakeApi, tmp_path: Path, name: str
) -> None:
    api.on("GET", "/jobs/j1/checkpoints", ok(listing({name: b"x"})))
    with pytest.raises(errors.OpenTinkerError, match="refusing a checkpoint file named"):
        download_checkpoint(api.client(), "j1", tmp_path / "model")
    assert not (tmp_path / "escape").exists() and not (tmp_path / ".model.partial").exists()


def test_progress_bar_on_a_terminal() -> None:
    out = io.StringIO()
    clock = iter([0.0, 0.05, 0.2, 0.3]).__next__
    p = Progress(4096, stream=out, tty=True, clock=clock)
    p.start_file("model.safetensors")  # drawn (t=0)
    p.advance(1024)  # t=0.05: too soon, not drawn
    p.advance(1024)  # t=0.2: drawn
    p.finish_file("model.safetensors", 2048, True)  # always drawn (t=0.3)
    p.close()
    assert out.getvalue().split("\r\x1b[2K") == [
        "",
        "[........................]   0%  0 B / 4.0 KiB  model.safetensors",
        "[############............]  50%  2.0 KiB / 4.0 KiB  model.safetensors",
        "[############............]  50%  2.0 KiB / 4.0 KiB  model.safetensors\n",
    ]


@pytest.fixture
def factory(api: FakeApi, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str, str], Client]:
    """The CLI run in tmp_path, its client talking to ``api``."""
    monkeypatch.setenv("OPENTINKER_CONFIG", str(tmp_path / "none.json"))
    monkeypatch.setenv("OPENTINKER_URL", BASE)
    monkeypatch.setenv("OPENTINKER_TOKEN", TOKEN)
    monkeypatch.chdir(tmp_path)
    return lambda url, token: api.client(url)


def test_cli_downloads_the_asked_step_as_an_archive(
    api: FakeApi, tmp_path: Path, factory: Callable[[str, str], Client], capsys: pytest.CaptureFixture[str]
) -> None:
    import tarfile

    api.on("GET", "/jobs/j1/checkpoints/ck1/files/meta.json", httpx.Response(200, content=FILES["meta.json"]))
    assert main(["jobs", "download", "j1", "--step", "2", "--archive"], client_factory=factory) == 0
    with tarfile.open(tmp_path / "j1-step2.tar.gz") as tar:
        assert tar.getnames() == ["j1-step2/meta.json"]
    captured = capsys.readouterr()
    assert (
        captured.out
        == "Saved checkpoint step 2 of job j1 (1 files, 11 B, 1 sha256 verified) to j1-step2.tar.gz\n"
    )
    assert captured.err == "meta.json  11 B  sha256 ok\n"  # stderr is not a terminal here: plain lines
    assert main(["jobs", "download", "j1", "ck1"], client_factory=factory) == 2
    assert "name a FILE of checkpoint CKPT" in capsys.readouterr().err


def test_cli_merge_lora_resumes_an_interrupted_download(
    api: FakeApi,
    tmp_path: Path,
    factory: Callable[[str, str], Client],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The adapter lands in a folder named after -o (not a fresh temporary one): a rerun keeps its files."""
    merged: list[list[str]] = []

    def merge(adapter: Path, dest: Path) -> None:  # the merge itself needs torch: not what is tested here
        merged.append(sorted(p.relative_to(adapter).as_posix() for p in adapter.rglob("*") if p.is_file()))
        dest.mkdir()

    monkeypatch.setattr("opentinker.cli.merge_lora", merge)
    name = "solver/model.safetensors"
    api.on("GET", f"/jobs/j1/checkpoints/ck2/files/{name}", httpx.ReadError("connection reset"))
    assert main(["jobs", "download", "j1", "--merge-lora", "-o", "merged"], client_factory=factory) != 0
    api.on("GET", f"/jobs/j1/checkpoints/ck2/files/{name}", httpx.Response(200, content=FILES[name]))
    before = len(api.requests)
    assert main(["jobs", "download", "j1", "--merge-lora", "-o", "merged"], client_factory=factory) == 0
    fetched = [r.url.path.rsplit("/files/", 1)[-1] for r in api.requests[before:] if "/files/" in r.url.path]
    assert fetched == [name]  # the two verified files were kept
    assert merged == [["meta.json", "proposer/adapter_model.safetensors", name]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # the work folder is gone
    capsys.readouterr()
