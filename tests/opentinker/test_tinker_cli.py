"""`opentinker tinker sessions|models|weights ...` against the real API server. alice (acme's owner) lists
and shows her organization's objects in plain lines (not a TTY) and downloads saved weights as a PEFT adapter
that peft loads onto the base, and with `--merge-lora` as a merged Hugging Face model with the same outputs;
charlie (globex) sees none of them and gets "not found" for their ids.
"""

from __future__ import annotations

import json
from urllib.parse import urlparse

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from api.tinker.models import TinkerWeights
from gpu_runtime.model_server import (
    AdamParams,
    Datum,
    ForwardBackward,
    LoraConfig,
    ModelServer,
    OptimStep,
    SaveState,
)
from gpu_runtime.models import load_model
from opentinker import tinker_client
from opentinker.cli import main
from tests.api.test_tinker_objects_api import ADAPTER, CONFIG, tinker_world

pytestmark = pytest.mark.django_db(transaction=True)
BASE = "tiny-qwen2"
PROMPT = [257, 10, 20, 30, 40]


@pytest.fixture
def tokens(live_server, alice, charlie, acme, globex, make_token, settings, tmp_path, monkeypatch):
    settings.OBJECT_STORE_URL = f"file://{tmp_path / 'objects'}"
    monkeypatch.setenv("OPENTINKER_URL", live_server.url)
    monkeypatch.setenv("OPENTINKER_CONFIG", str(tmp_path / "no-config.json"))
    return {"alice": make_token(alice, acme), "charlie": make_token(charlie, globex)}


def cli(monkeypatch, token: str, *argv: str) -> int:
    monkeypatch.setenv("OPENTINKER_TOKEN", token)
    return main(list(argv))


def test_list_show_and_download_an_adapter(tokens, alice, acme, monkeypatch, tmp_path, capsys):
    w = tinker_world(acme, alice, steps=2)
    model = w["model"]
    assert cli(monkeypatch, tokens["alice"], "tinker", "sessions", "list") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == [
        "SESSION",
        "BY",
        "CREATED",
        "LAST",
        "HEARTBEAT",
        "FINISHED",
        "TRAINING",
        "SAMPLERS",
    ]
    assert len(out) == 2 and out[1].startswith(w["session"]) and out[1].split()[-2:] == ["1", "1"]

    assert cli(monkeypatch, tokens["alice"], "tinker", "models", "list") == 0
    row = capsys.readouterr().out.splitlines()[1].split()
    assert row[:7] == [model, BASE, "4", "2", "2", "1", "2"]  # steps 2, fwd-bwd 2, pending 1, saved 2

    assert cli(monkeypatch, tokens["alice"], "tinker", "models", "show", model) == 0
    shown = capsys.readouterr().out
    assert f"tinker://{model}/weights/ck" in shown and f"tinker://{model}/sampler_weights/sw" in shown

    path = f"tinker://{model}/weights/ck"
    assert cli(monkeypatch, tokens["alice"], "tinker", "weights", "show", path) == 0
    shown = capsys.readouterr().out
    assert "optimizer.safetensors" in shown and "adapter_model.safetensors" in shown

    dest = tmp_path / "got"
    assert cli(monkeypatch, tokens["alice"], "tinker", "weights", "download", path, "-o", str(dest)) == 0
    out, err = capsys.readouterr()
    assert (
        out.strip()
        == f"Saved {path} (3 files, {len(CONFIG) + len(ADAPTER) + 2} B) to {dest} as a PEFT adapter"
    )
    assert "\r" not in err  # not a terminal: a plain line per file
    assert sorted(p.name for p in dest.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "meta.json",
    ]
    assert (dest / "adapter_model.safetensors").read_bytes() == ADAPTER
    assert (dest / "adapter_config.json").read_bytes() == CONFIG
    # the Adam moments only when asked; a destination that exists is refused before anything is fetched
    full = tmp_path / "full"
    args = ("tinker", "weights", "download", path, "-o", str(full), "--with-optimizer", "--json")
    assert cli(monkeypatch, tokens["alice"], *args) == 0
    assert json.loads(capsys.readouterr().out)["files"] == 4 and (full / "optimizer.safetensors").exists()
    assert cli(monkeypatch, tokens["alice"], "tinker", "weights", "download", path, "-o", str(dest)) == 1
    assert "already exists" in capsys.readouterr().err


def test_lists_page_through_every_page(tokens, alice, acme, charlie, globex, monkeypatch, capsys):
    """Pages of 2 (the client's page size patched down from 200): 3 sessions, 3 models, 6 weights all come."""
    monkeypatch.setattr(tinker_client, "PAGE", 2)
    worlds = [tinker_world(acme, alice, steps=0) for _ in range(3)]
    tinker_world(globex, charlie, steps=0)
    for what, count in (("sessions", 3), ("models", 3), ("weights", 6)):
        assert cli(monkeypatch, tokens["alice"], "tinker", what, "list", "--json") == 0
        rows = json.loads(capsys.readouterr().out)
        assert len(rows) == count and len({r["id"] for r in rows}) == count, what
    assert cli(monkeypatch, tokens["alice"], "tinker", "sessions", "list", "--json") == 0
    assert [r["id"] for r in json.loads(capsys.readouterr().out)] == [w["session"] for w in reversed(worlds)]
    assert cli(monkeypatch, tokens["charlie"], "tinker", "weights", "list", "--json") == 0
    assert len(json.loads(capsys.readouterr().out)) == 2


def test_outsider_sees_nothing(tokens, alice, acme, monkeypatch, capsys):
    w = tinker_world(acme, alice, steps=1)
    assert cli(monkeypatch, tokens["charlie"], "tinker", "sessions", "list") == 0
    assert capsys.readouterr().out.strip() == "No Tinker sessions yet."
    assert cli(monkeypatch, tokens["charlie"], "tinker", "weights", "list") == 0
    assert capsys.readouterr().out.strip() == "No saved weights."
    for argv in (
        ("tinker", "sessions", "show", w["session"]),
        ("tinker", "models", "show", w["model"]),
        ("tinker", "weights", "show", f"tinker://{w['model']}/weights/ck"),
        ("tinker", "weights", "download", f"tinker://{w['model']}/weights/ck"),
    ):
        assert cli(monkeypatch, tokens["charlie"], *argv) == 1
        err = capsys.readouterr().err
        assert "no such" in err or "no saved weights" in err, err


@pytest.mark.slow
def test_download_merged_has_the_adapters_outputs(tokens, alice, acme, monkeypatch, tmp_path, capsys):
    """A real adapter, as the model server saves it after a step, merged on the user's machine."""

    def publish(uri: str, files: dict[str, bytes]) -> None:
        if "sampler_weights" not in uri:
            return
        server = ModelServer(BASE)
        server.create_model("m", LoraConfig(rank=4, seed=1))
        datum = Datum(PROMPT[:-1], {"target_tokens": PROMPT[1:], "weights": [1.0] * 4})
        server.call("m", 1, ForwardBackward([datum], "cross_entropy"))
        server.call("m", 2, OptimStep(AdamParams(learning_rate=1e-2)))
        server.call("m", 3, SaveState(uri, for_sampler=True))

    w = tinker_world(acme, alice, steps=1, publish=publish)
    sw = TinkerWeights.objects.get(model_id=w["model"], name="sw")
    dest = tmp_path / "merged"
    argv = ("tinker", "weights", "download", f"tinker://{w['model']}/sampler_weights/sw", "-o", str(dest))
    assert cli(monkeypatch, tokens["alice"], *argv, "--merge-lora") == 0
    assert capsys.readouterr().out.strip().endswith(f"to {dest} as a merged model")
    assert not (tmp_path / ".merged.merge").exists()
    assert not any(p.name.startswith("adapter") for p in dest.iterdir())
    adapter_dir = urlparse(sw.uri).path
    with torch.no_grad():
        expected = PeftModel.from_pretrained(load_model(BASE).model, adapter_dir).eval()(
            torch.tensor([PROMPT])
        )
        base = load_model(BASE).model.eval()(torch.tensor([PROMPT]))
        merged = AutoModelForCausalLM.from_pretrained(dest).eval()(torch.tensor([PROMPT]))
    torch.testing.assert_close(merged.logits, expected.logits, rtol=1e-4, atol=1e-5)
    assert (merged.logits - base.logits).abs().max() > 1e-4  # the step changed the model
