"""`make demo DEMO_ARGS=--multi-agent`: the two-policy example writes its warm-start data (the rule player's
tic-tac-toe games) with the runtime's data CLI into the organization's store, where the SFT job reads it."""

from __future__ import annotations

import json

import pytest

from devstack.demo import main
from devstack.recipes import MultiAgentRecipe
from gpu_runtime.data.board_sft import board_conversations
from gpu_runtime.data.sft import load_chat_jsonl
from opentinker.spec import (
    EXAMPLE_MULTIAGENT_ENV_CONFIG,
    example_multiagent_sft_spec,
    example_multiagent_spec,
)


def test_the_multi_agent_example_writes_the_rule_players_games_to_the_store(tmp_path):
    recipe = MultiAgentRecipe("http://127.0.0.1:9", "otk_unused", f"file://{tmp_path}/objects", "acme")
    uri = recipe.write_dataset()
    path = tmp_path / "objects/orgs/acme/datasets/tic-tac-toe-sft.jsonl"
    assert uri == f"file://{path}"
    lines = path.read_text().splitlines()
    assert len(lines) == MultiAgentRecipe.sft_examples
    assert json.loads(lines[0]) == {
        "messages": board_conversations(1, seed=0, **EXAMPLE_MULTIAGENT_ENV_CONFIG)[0]
    }
    assert len(load_chat_jsonl(uri)) == MultiAgentRecipe.sft_examples
    # The specs it submits: the warm start on that data, then two policies (one full, one LoRA) from it.
    assert example_multiagent_sft_spec(uri).dataset.uri == uri
    ma = example_multiagent_spec("file:///ck/step_000060").multi_agent
    assert ma.trained == ["alice", "bob"] and ma.policies["bob"].model.lora is not None
    assert ma.policies["alice"].model is None and ma.rotate_roles and ma.eval_vs_rule is not None


def test_the_demo_takes_a_multi_agent_flag(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--multi-agent" in capsys.readouterr().out
