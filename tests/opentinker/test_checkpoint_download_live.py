"""`opentinker jobs download ID` end to end: a real 2-step LoRA job on tiny-qwen2 writes its checkpoint, the
CLI downloads it from the live API server (whole directory, archive, merged), and the merged model loaded by
plain transformers produces the same greedy tokens as the runtime's own eval path (the trainer's resumed
weights in the rollout engine). Actors: alice (owner of acme), bob (member of acme), charlie (outsider)."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gpu_runtime import checkpoint
from gpu_runtime.controller import Controller, LocalGroup
from gpu_runtime.models import load_model
from gpu_runtime.rollout.base import SamplingParams
from gpu_runtime.trainer import Trainer
from gpu_runtime.workers import rollout_engine
from opentinker.cli import main
from portal.actors import Actor
from portal.models import Checkpoint
from portal.services.jobs import job_submit
from tests.gpu_runtime.conftest import small_spec
from tests.gpu_runtime.test_controller import ListSink, coin_env  # noqa: F401 - the environment fixture

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

PROMPT = "Flip 7"
MAX_NEW = 12


@pytest.fixture
def trained(tmp_path, settings, coin_env, alice, acme):  # noqa: F811
    """A finished 2-step LoRA job: its row, its spec and its checkpoint rows pointing into the store."""
    torch.set_num_threads(1)
    settings.OBJECT_STORE_URL = f"file://{tmp_path}/store"
    # Groups of 4: with 2 samples a group had equal rewards by chance often enough (each of the 4 groups
    # with probability 1/2) that no step updated the adapter on some seeds; now ~(1/8)^4.
    spec = small_spec(lora={"rank": 4, "alpha": 8.0}, steps=2, group_size=4)
    sink = ListSink()
    Controller(spec, sink, LocalGroup(spec), f"file://{tmp_path}/store/ck").run()
    job, _ = job_submit(organization=acme, actor=Actor.for_request(alice), spec=spec)
    saved = [r for r in sink.records if r["type"] == "checkpoint"]
    assert [r["step"] for r in saved] == [2]
    for r in saved:
        Checkpoint.objects.create(
            job=job,
            step=r["step"],
            uri=r["uri"],
            size_bytes=sum(f["size"] for f in r["files"]),
            files=r["files"],
        )
    return job, spec, saved[-1]


@pytest.fixture
def cli_as(live_server, make_token, monkeypatch, tmp_path):
    monkeypatch.setenv("OPENTINKER_CONFIG", str(tmp_path / "none.json"))
    monkeypatch.setenv("OPENTINKER_URL", live_server.url)

    def run(user, org, *argv: str) -> int:
        monkeypatch.setenv("OPENTINKER_TOKEN", make_token(user, org))
        return main(["jobs", "download", *argv])

    return run


def runtime_greedy(spec, uri: str) -> list[int]:
    """What the runtime's eval samples: the checkpoint resumed into the trainer, its merged weights loaded
    into the rollout engine, argmax decoding."""
    ck = checkpoint.load(uri)
    trainer = Trainer(spec)
    trainer.load(ck.weights, ck.state, adapter=ck.adapter)
    loaded = load_model(spec.model.base, seed=spec.seed)
    engine = rollout_engine(loaded.model, pad_id=loaded.tokenizer.pad_token_id, device="cpu")
    engine.load_weights(trainer.full_state_dict())
    tok = loaded.tokenizer
    sp = SamplingParams(max_new_tokens=MAX_NEW, stop_ids=(tok.eos_token_id,), greedy=True)
    return engine.generate([prompt_ids(tok)], sp).token_ids[0]


def prompt_ids(tok) -> list[int]:
    text = tok.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False
    )
    return tok(text, add_special_tokens=False).input_ids


def transformers_greedy(model_dir: Path) -> list[int]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids(tok)])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=MAX_NEW,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    new = out[0, ids.shape[1] :].tolist()
    return new[: new.index(tok.eos_token_id) + 1] if tok.eos_token_id in new else new


def test_download_whole_checkpoint_archive_and_merged_model(
    trained, cli_as, alice, bob, charlie, acme, globex, tmp_path, capsys
):
    job, spec, saved = trained
    out = tmp_path / "out"

    # The teammate downloads the latest checkpoint: every file but the trainer state, sha256 verified.
    assert cli_as(bob, acme, str(job.id), "-o", str(out / "raw")) == 0
    expected = sorted(f["name"] for f in saved["files"] if f["name"] != "trainer_state.pt")
    assert sorted(p.name for p in (out / "raw").rglob("*") if p.is_file()) == expected
    assert {"adapter_model.safetensors", "adapter_config.json", "config.json", "meta.json"} <= set(expected)
    assert capsys.readouterr().out.startswith(
        f"Saved checkpoint step 2 of job {job.id} ({len(expected)} files"
    )
    assert not list(out.glob(".*"))  # no partial directory or temp file left behind

    # --with-trainer-state adds it; --archive writes one .tar.gz with a top folder.
    assert cli_as(alice, acme, str(job.id), "--step", "2", "--with-trainer-state", "--archive",
                  "-o", str(out / "ck.tar.gz")) == 0  # fmt: skip
    with tarfile.open(out / "ck.tar.gz") as tar:
        names = sorted(m.name for m in tar.getmembers())
    assert names == sorted(f"ck/{f['name']}" for f in saved["files"])

    # An existing destination is refused (never half-overwritten); an unknown step lists the steps there are.
    assert cli_as(alice, acme, str(job.id), "-o", str(out / "raw")) == 1
    assert "already exists" in capsys.readouterr().err
    assert cli_as(alice, acme, str(job.id), "--step", "9", "-o", str(out / "nine")) == 1
    assert "no checkpoint at step 9 (steps: 2)" in capsys.readouterr().err
    # The outsider learns nothing: the job is a 404.
    assert cli_as(charlie, globex, str(job.id), "-o", str(out / "stolen")) == 1
    assert not (out / "stolen").exists()

    # Merged: a plain Hugging Face model, no PEFT needed to load it.
    assert cli_as(alice, acme, str(job.id), "--merge-lora", "-o", str(out / "merged")) == 0
    merged = out / "merged"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in merged.iterdir()}
    assert not any("lora" in k for k in load_file(merged / "model.safetensors"))
    assert (
        "peft" not in json.loads((merged / "config.json").read_text()).get("architectures", [""])[0].lower()
    )
    base = load_model(spec.model.base, seed=spec.seed).model.state_dict()
    weights = load_file(merged / "model.safetensors")
    changed = [k for k in weights if not torch.equal(weights[k], base[k])]
    assert changed and all("proj" in k for k in changed)  # the adapter's update is in the weights

    ours = runtime_greedy(spec, saved["uri"])
    assert len(ours) > 0
    assert transformers_greedy(merged) == ours


def test_whole_checkpoint_from_s3_follows_presigned_links(
    live_server, s3_store, alice, acme, make_token, tmp_path
):
    """An S3 store: every file is a redirect to a presigned URL; the SDK follows it (httpx drops the
    Authorization header on a redirect to another origin) and still checks each sha256. Nested names
    (multi-agent policies) keep their folders."""
    import hashlib

    from opentinker.checkpoint_download import download_checkpoint
    from opentinker.client import Client

    files = {
        "meta.json": b"{}",
        "solver/adapter_model.safetensors": b"A" * 100,
        "solver/trainer_state.pt": b"S",
    }
    for name, body in files.items():
        s3_store.client.put_object(Bucket="otk-store", Key=f"store/ck/{name}", Body=body)
    job, _ = job_submit(organization=acme, actor=Actor.for_request(alice), spec=small_spec())
    Checkpoint.objects.create(
        job=job,
        step=3,
        uri="s3://otk-store/store/ck",
        files=[
            {"name": n, "size": len(b), "sha256": hashlib.sha256(b).hexdigest()} for n, b in files.items()
        ],
    )
    with Client(live_server.url, make_token(alice, acme)) as client:
        got = download_checkpoint(client, str(job.id), tmp_path / "ck")
    assert got.verified == 2
    assert (tmp_path / "ck" / "solver" / "adapter_model.safetensors").read_bytes() == b"A" * 100
    assert not (tmp_path / "ck" / "solver" / "trainer_state.pt").exists()
