"""`opentinker models push|list`, `opentinker datasets push|list` and the SDK's resumable push, against the
real API server. Actors: alice (owner of acme), charlie (outsider, owner of globex)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from env_registry import uploads
from env_registry.models import ModelVersion, Upload
from opentinker.cli import main
from opentinker.client import Client
from opentinker.spec import example_rl_spec
from portal.models import Job
from tests.api.test_registry import parquet_bytes, prompt_completion_rows, tiny_model_files

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def tokens(live_server, alice, charlie, acme, globex, make_token, settings, tmp_path, monkeypatch):
    settings.OBJECT_STORE_URL = f"file://{tmp_path / 'objects'}"
    settings.ENV_VALIDATION_MODE = "celery"  # the sandbox's check is tests/api/test_registry.py's
    monkeypatch.setattr(uploads, "CHUNK_MAX_BYTES", 16 * 1024)
    monkeypatch.setenv("OPENTINKER_URL", live_server.url)
    monkeypatch.setenv("OPENTINKER_CONFIG", str(tmp_path / "no-config.json"))
    return {"alice": make_token(alice, acme), "charlie": make_token(charlie, globex)}


def cli(monkeypatch, token: str, *argv: str) -> int:
    monkeypatch.setenv("OPENTINKER_TOKEN", token)
    return main(list(argv))


def model_dir(root: Path) -> Path:
    root.mkdir(parents=True)
    for name, data in tiny_model_files().items():
        (root / name).write_bytes(data)
    return root


def test_models_push_prints_progress_lines_and_the_new_reference(tokens, monkeypatch, tmp_path, capsys):
    d = model_dir(tmp_path / "tiny")
    capsys.readouterr()  # transformers' own progress while making the model
    assert cli(monkeypatch, tokens["alice"], "models", "push", str(d), "--name", "tiny") == 0
    out, err = capsys.readouterr()
    assert out.strip() == "pushed acme/tiny@1  status: pending"
    # Not a terminal: one plain line per file, no carriage returns.
    assert "\r" not in err
    lines = err.strip().splitlines()
    assert [line.split("  ")[0] for line in lines] == sorted(p.name for p in d.iterdir())
    assert sorted(f["path"] for f in ModelVersion.objects.get().files) == sorted(p.name for p in d.iterdir())

    assert cli(monkeypatch, tokens["alice"], "models", "list") == 0
    assert "acme/tiny@1" in capsys.readouterr().out
    assert cli(monkeypatch, tokens["charlie"], "models", "list") == 0
    assert capsys.readouterr().out.strip() == "None yet."
    # `opentinker models` alone still lists the presets
    assert cli(monkeypatch, tokens["alice"], "models") == 0
    assert "tiny-qwen2" in capsys.readouterr().out


def test_models_push_of_pickle_weights_fails_with_the_reason(tokens, monkeypatch, tmp_path, capsys):
    d = model_dir(tmp_path / "tiny")
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    # a 400 from the server is a validation error: exit 2, as for a bad job spec
    assert cli(monkeypatch, tokens["alice"], "models", "push", str(d), "--name", "tiny") == 2
    assert "pytorch_model.bin: pickle weights are never loaded" in capsys.readouterr().err
    assert Upload.objects.count() == 0 and ModelVersion.objects.count() == 0


def test_datasets_push_and_list(tokens, monkeypatch, tmp_path, capsys):
    f = tmp_path / "arith.parquet"
    f.write_bytes(parquet_bytes(prompt_completion_rows()))
    assert cli(monkeypatch, tokens["alice"], "datasets", "push", str(f), "--name", "arith") == 0
    assert capsys.readouterr().out.strip() == "pushed acme/arith@1  12 rows, columns: question, answer"
    assert cli(monkeypatch, tokens["alice"], "datasets", "list") == 0
    assert "acme/arith@1" in capsys.readouterr().out


class LoseAnswers(httpx.BaseTransport):
    """Delivers every request, but loses the answer of every third chunk (the server did store it)."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.chunks = 0
        self.lost = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if request.method == "PUT":
            self.chunks += 1
            if self.chunks % 3 == 0:
                response.read()
                self.lost += 1
                raise httpx.ReadError("connection reset", request=request)
        return response


def test_push_goes_on_from_what_arrived_when_answers_are_lost(tokens, tmp_path, live_server):
    d = model_dir(tmp_path / "tiny")
    transport = LoseAnswers()
    done: list[int] = []
    with Client(live_server.url, tokens["alice"], transport=transport) as client:
        result = client.registry.push("model", "tiny", d, on_bytes=done.append)
    assert result["ref"] == "acme/tiny@1" and transport.lost >= 2
    total = sum(p.stat().st_size for p in d.iterdir())
    assert sum(done) == total  # each byte counted once, though some chunks' answers were lost
    stored = Path(ModelVersion.objects.get().uri.removeprefix("file://"))
    for p in d.iterdir():
        assert (stored / p.name).read_bytes() == p.read_bytes()


class LoseTheCompletion(httpx.BaseTransport):
    """Delivers every request; the answer of the first `complete` is lost (the server stored the version)."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.complete_timeouts: list[dict] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if request.url.path.endswith("/complete"):
            self.complete_timeouts.append(dict(request.extensions["timeout"]))
            if len(self.complete_timeouts) == 1:
                response.read()
                raise httpx.ReadTimeout("timed out", request=request)
        return response


def test_a_lost_completion_is_found_on_resume_and_completion_waits_long(tokens, tmp_path, live_server):
    from opentinker.errors import ApiConnectionError, OpenTinkerError
    from opentinker.registry_client import COMPLETE_TIMEOUT_S

    d = model_dir(tmp_path / "tiny")
    transport = LoseTheCompletion()
    with Client(live_server.url, tokens["alice"], transport=transport) as client:
        with pytest.raises(ApiConnectionError) as lost:
            client.registry.push("model", "tiny", d)
        assert Upload.objects.count() == 0 and ModelVersion.objects.count() == 1  # it did complete
        message = str(lost.value)
        assert (
            "may or may not have been applied" in message
            and "finds out whether the version was stored" in (message)
        )
        uid = message.split("--resume ")[1].split("`")[0]
        result = client.registry.push("model", "tiny", d, upload_id=uid)
        assert result["ref"] == "acme/tiny@1" and result["model"]["version"] == 1
        # a resumed upload whose files no version holds was refused or aborted
        (d / "config.json").write_text((d / "config.json").read_text() + " ")
        with pytest.raises(OpenTinkerError, match="no version of tiny holds these files"):
            client.registry.push("model", "tiny", d, upload_id=uid)
    assert transport.complete_timeouts[0]["read"] == COMPLETE_TIMEOUT_S == 3600.0
    assert transport.complete_timeouts[0]["connect"] == 30.0
    assert ModelVersion.objects.count() == 1


def test_models_promote_copies_a_jobs_checkpoint_into_the_registry(tokens, monkeypatch, tmp_path, capsys):
    from tests.api.test_registry_promote import RUNTIME_FILES, write_checkpoint
    from tests.conftest import client_for

    spec = example_rl_spec().model_dump(mode="json")
    resp = client_for(tokens["alice"]).post("/api/v1/jobs", spec, format="json")
    assert resp.status_code == 201, resp.content
    job = Job.objects.get(pk=resp.json()["id"])
    write_checkpoint(tmp_path / "objects", job, 4, {**tiny_model_files(), **RUNTIME_FILES})
    args = ("models", "promote", str(job.id), "--step", "4", "--name", "trained")
    assert cli(monkeypatch, tokens["alice"], *args) == 0
    assert capsys.readouterr().out.strip() == "promoted acme/trained@1  status: pending"
    assert sorted(f["path"] for f in ModelVersion.objects.get().files) == sorted(tiny_model_files())
    # another organization's job is as absent as one that never existed
    assert cli(monkeypatch, tokens["charlie"], *args) != 0
    assert "no such job" in capsys.readouterr().err
    assert ModelVersion.objects.count() == 1


def test_models_push_sends_files_straight_to_an_s3_store_in_parts(
    live_server, alice, acme, make_token, s3_store, settings, tmp_path, monkeypatch, capsys
):
    from opentinker import registry_client

    settings.ENV_VALIDATION_MODE = "celery"
    monkeypatch.setattr(registry_client, "DIRECT_MIN_BYTES", 0)  # every file, however small
    calls: list[str] = []  # which way each file went (the views call the module's functions)
    for way in ("upload_chunk", "upload_multipart_complete"):
        real = getattr(uploads, way)
        monkeypatch.setattr(
            uploads, way, lambda *a, _real=real, _way=way, **k: calls.append(_way) or _real(*a, **k)
        )
    monkeypatch.setenv("OPENTINKER_URL", live_server.url)
    monkeypatch.setenv("OPENTINKER_CONFIG", str(tmp_path / "no-config.json"))
    d = model_dir(tmp_path / "tiny")
    capsys.readouterr()
    assert cli(monkeypatch, make_token(alice, acme), "models", "push", str(d), "--name", "tiny") == 0
    assert capsys.readouterr().out.strip() == "pushed acme/tiny@1  status: pending"
    prefix = "store/orgs/acme/models/tiny/1/"
    for name, data in tiny_model_files().items():
        assert s3_store.client.get_object(Bucket=s3_store.bucket, Key=prefix + name)["Body"].read() == data
    listed = s3_store.client.list_objects_v2(Bucket=s3_store.bucket)["Contents"]
    assert sorted(o["Key"] for o in listed) == sorted(prefix + n for n in tiny_model_files())
    assert calls == ["upload_multipart_complete"] * len(tiny_model_files())
