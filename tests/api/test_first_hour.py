"""The user's first hour, end to end, as one chain (issue 15): a model directory made with transformers
(`save_pretrained`) pushed with `opentinker models push`, a dataset uploaded as Parquet with `opentinker
datasets push`, an SFT job on them (`opentinker jobs submit`, model.base = acme/tiny@1, dataset.uri =
acme/arith@1 with a column mapping), then a LoRA GRPO job from the SFT checkpoint whose prompts and reference
answers are the same dataset (opentinker/answer-match, two rows held out and evaluated), its final checkpoint
downloaded merged (`opentinker jobs download ID --merge-lora`), loaded with plain transformers: the same
greedy tokens as the runtime's own eval.

The jobs run in this process (Controller + LocalGroup) on the spec the API stored, reporting over HTTP to the
live server's ingest API with their job tokens (HttpSink), as a pool's runtime does. Actors: alice (owner,
pushes, submits, downloads), bob (member of acme, reads the checkpoints), charlie (globex: 404s).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from gpu_runtime.controller import EXIT_OK, Controller, LocalGroup
from gpu_runtime.data.arithmetic_sft import arithmetic_conversations
from gpu_runtime.sink import HttpSink
from opentinker.cli import main
from opentinker.client import Client
from opentinker.spec import JobSpec
from portal.models import Job
from portal.services.ingest import checkpoint_prefix
from portal.services.job_tokens import job_ingest_url, job_token_issue
from tests.gpu_runtime.test_controller import ListSink
from tests.tiny_model import tiny_model_files

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

SFT_STEPS, RL_STEPS, MAX_NEW = 4, 2, 6


@pytest.fixture
def cli(live_server, make_token, monkeypatch, tmp_path):
    monkeypatch.setenv("OPENTINKER_CONFIG", str(tmp_path / "none.json"))
    monkeypatch.setenv("OPENTINKER_URL", live_server.url)

    def run(user, org, *argv: str) -> int:
        monkeypatch.setenv("OPENTINKER_TOKEN", make_token(user, org))
        return main(list(argv))

    return run


def submit(cli, user, org, spec: dict, tmp_path: Path, capsys) -> Job:
    path = tmp_path / f"{spec['name']}.json"
    path.write_text(json.dumps(spec))
    capsys.readouterr()
    assert cli(user, org, "jobs", "submit", str(path)) == 0
    job_id = re.search(r"Submitted job (\S+) ", capsys.readouterr().out).group(1)
    return Job.objects.get(pk=job_id)


def run_job(job: Job, live_server) -> JobSpec:
    """The job as a pool runs it: the stored spec, checkpoints under the job's prefix, reports over HTTP."""
    spec = JobSpec.model_validate(job.spec)
    sink = HttpSink(job_ingest_url(job, live_server.url), job_token_issue(job), heartbeat_every_s=0)
    result = Controller(spec, sink, LocalGroup(spec), checkpoint_prefix(job)).run()
    assert result.exit_code == EXIT_OK, result
    return spec


def runtime_eval(spec: JobSpec, uri: str, row: int) -> tuple[list[int], list[int]]:
    """The runtime's own greedy eval of dataset row `row` from the checkpoint at `uri`: (prompt, generated)"""
    ctl = Controller(spec, ListSink(), LocalGroup(spec), None)
    ctl.resume(uri)
    ctl.sync_weights()
    [sample], _ = ctl.group.rollout.collect([row], [0], 0, True)
    first = sample.mask.index(1)
    return sample.token_ids[:first], sample.token_ids[first:]


def transformers_greedy(model_dir: Path, messages: list[dict[str, str]], max_new: int) -> tuple[list, list]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    ids = torch.tensor([list(prompt)])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_new,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    new = out[0, ids.shape[1] :].tolist()
    return list(prompt), new[: new.index(tok.eos_token_id) + 1] if tok.eos_token_id in new else new


def test_first_hour_push_model_and_parquet_sft_then_rl_download_merged_same_greedy_tokens(
    cli, live_server, alice, bob, charlie, acme, globex, make_token, settings, tmp_path, capsys
):
    torch.set_num_threads(1)
    settings.OBJECT_STORE_URL = f"file://{tmp_path}/store"

    # A model directory made with transformers, and a Parquet dataset, pushed with the CLI.
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    for name, body in tiny_model_files(seed=3).items():
        (model_dir / name).write_bytes(body)
    assert cli(alice, acme, "models", "push", str(model_dir), "--name", "tiny") == 0
    convs = arithmetic_conversations(24, seed=0, max_operand=2)  # answers 0-4: some sampled right
    rows = [{"sys": c[0]["content"], "q": c[1]["content"], "a": c[2]["content"]} for c in convs]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "arith.parquet")
    assert cli(alice, acme, "datasets", "push", str(tmp_path / "arith.parquet"), "--name", "arith") == 0
    out = capsys.readouterr().out
    assert "acme/tiny@1" in out and "pushed acme/arith@1  24 rows" in out

    # SFT on them.
    sft = submit(cli, alice, acme, {
        "kind": "sft", "name": "warm-start",
        "model": {"base": "acme/tiny@1"},
        "dataset": {"uri": "acme/arith@1", "columns": {"system": "sys", "prompt": "q", "completion": "a"}},
        "algorithm": {"steps": SFT_STEPS, "batch_size": 8, "micro_batch_size": 8, "learning_rate": 1e-2},
        "checkpoint": {"every_steps": 100, "keep_last": 1},
        "seed": 1,
    }, tmp_path, capsys)  # fmt: skip
    run_job(sft, live_server)
    with Client(live_server.url, make_token(bob, acme)) as client:  # the teammate sees the checkpoint
        [sft_ckpt] = client.jobs.checkpoints(str(sft.id))
    assert sft_ckpt.step == SFT_STEPS

    # GRPO with LoRA from the SFT checkpoint; the prompts and reference answers are the same dataset.
    held_out = 2
    rl = submit(cli, alice, acme, {
        "kind": "rl", "name": "grpo-from-sft",
        "model": {"base": sft_ckpt.uri, "lora": {"rank": 4, "alpha": 8.0}},
        "environment": {"ref": "opentinker/answer-match@latest", "config": {"match": "numeric"}},
        "dataset": {"uri": "acme/arith@latest", "columns": {"system": "sys", "prompt": "q", "answer": "a"},
                    "eval_rows": held_out},
        "algorithm": {"name": "grpo", "steps": RL_STEPS, "batch_size": 2, "group_size": 8,
                      "max_new_tokens": MAX_NEW, "learning_rate": 1e-2},
        "checkpoint": {"every_steps": 100, "keep_last": 1},
        "seed": 1,
    }, tmp_path, capsys)  # fmt: skip
    rl_spec = run_job(rl, live_server)
    assert rl_spec.dataset.registry_ref == "acme/arith@1" and rl_spec.model.base == sft_ckpt.uri
    with Client(live_server.url, make_token(alice, acme)) as client:
        series = {s.name: s for s in client.jobs.metrics(str(rl.id))}
        [rl_ckpt] = client.jobs.checkpoints(str(rl.id))
    assert series["reward/mean"].steps == [1, 2]
    # Some group had both right and wrong answers, so GRPO had something to learn from.
    assert min(v for v in series["groups/zero_std_frac"].values) < 1.0, series["reward/mean"].values
    assert series["eval/episodes"].points() == [(RL_STEPS, float(held_out))]

    # Downloaded merged; the outsider gets nothing.
    merged = tmp_path / "merged"
    assert cli(charlie, globex, "jobs", "download", str(rl.id), "--merge-lora", "-o", str(merged)) == 1
    assert not merged.exists()
    assert cli(alice, acme, "jobs", "download", str(rl.id), "--merge-lora", "-o", str(merged)) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in merged.iterdir()}
    sft_weights = load_file(Path(urlparse(sft_ckpt.uri).path) / "model.safetensors")
    weights = load_file(merged / "model.safetensors")
    assert set(weights) <= set(sft_weights) and len(weights) >= 20  # the whole model, no adapter keys
    changed = [k for k in weights if not torch.equal(weights[k], sft_weights[k])]
    assert changed and all("proj" in k for k in changed)  # the RL adapter's update, merged into the SFT model

    # Plain transformers on the merged model = the runtime's own greedy eval, on a held-out row.
    row = len(rows) - 1
    messages = [{"role": "system", "content": rows[row]["sys"]}, {"role": "user", "content": rows[row]["q"]}]
    prompt, ours = runtime_eval(rl_spec, rl_ckpt.uri, row)
    hf_prompt, theirs = transformers_greedy(merged, messages, MAX_NEW)
    assert hf_prompt == prompt and len(ours) > 0
    assert theirs == ours
