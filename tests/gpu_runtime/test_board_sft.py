"""The board-game SFT data CLI (`python -m gpu_runtime.data.board_sft`): the conversations it writes render to
exactly the tokens and loss mask that a multi-agent rollout of the same game holds."""

from __future__ import annotations

import json

import pytest

from gpu_runtime.data.board_sft import board_conversation, board_conversations, main
from gpu_runtime.data.sft import encode_chat, load_chat_jsonl
from gpu_runtime.models import build_byte_tokenizer
from opentinker.env.builtin.tictactoe import TicTacToeEnv
from opentinker.env.codec import HFChatCodec
from opentinker.env.multiagent import MultiAgentProtocol, RulePolicy
from opentinker.env.protocol import Budget
from opentinker.spec import EXAMPLE_MULTIAGENT_ENV_CONFIG

CONFIG = EXAMPLE_MULTIAGENT_ENV_CONFIG


@pytest.mark.parametrize(
    "config",
    [
        CONFIG,
        {**CONFIG, "prompt_style": "lines"},
        {**CONFIG, "prompt_style": "mover"},
        {**CONFIG, "prompt_style": "mover-digits"},
        {},
    ],
    ids=["compact", "lines", "mover", "mover-digits", "default"],
)
@pytest.mark.parametrize("student", ["x", "o"])
def test_a_conversation_is_the_token_sequence_a_rollout_of_the_same_game_holds(config, student):
    import random

    tok = build_byte_tokenizer()
    codec = HFChatCodec(tok)
    for seed in (3, 11, 12345):
        conv = board_conversation("tic-tac-toe", seed, student, noise=0.0, rng=random.Random(0), **config)
        env = TicTacToeEnv(**config)

        def rule_moves(ids, max_new, env=env):
            return [*tok.encode(env.rule_based_action(student)), codec.eos_id]

        players = {r: rule_moves if r == student else RulePolicy() for r in env.roles}
        game = MultiAgentProtocol(Budget(max_turns=20, max_new_tokens=16)).run(env, players, codec, seed)
        ep = game.per_role[student]
        ids, mask = encode_chat(tok, conv)
        n = len(ep.token_ids)
        # The same tokens (never re-tokenized differently); the template's newline after the last end of turn
        # is all the SFT rendering adds, outside the loss.
        assert ids[:n] == ep.token_ids and tok.decode(ids[n:]) == "\n" and mask[n:] == [0]
        assert mask[:n] == ep.mask  # loss on exactly the generated tokens (move + end of turn)
        assert [m["content"] for m in conv if m["role"] == "assistant"] == [t.action for t in ep.turns]


def test_conversations_alternate_seats_follow_the_rule_player_and_are_reproducible():
    convs = board_conversations(40, seed=0, noise=0.5, **CONFIG)
    assert len(convs) == 40 and convs == board_conversations(40, seed=0, noise=0.5, **CONFIG)
    assert convs != board_conversations(40, seed=1, noise=0.5, **CONFIG)
    firsts = [c[0]["content"].split("\n")[0] for c in convs]
    assert {"X", "O"} == set(firsts)
    for conv in convs:
        assert conv[0]["role"] == "user" and any(m["role"] == "assistant" for m in conv)
        for i, m in enumerate(conv):
            if m["role"] == "assistant":  # a free cell's digit, the rule player's choice on the board shown
                *_, r1, r2, r3, free = conv[i - 1]["content"].split("\n")
                env = TicTacToeEnv(**CONFIG)
                env.reset(0)
                env.board = [[ch if ch in "XO" else "." for ch in row] for row in (r1, r2, r3)]
                assert free == "".join(ch for ch in r1 + r2 + r3 if ch.isdigit())
                assert m["content"] in free and m["content"].isdigit()
                assert m["content"] == env.rule_based_action(conv[0]["content"][0].lower())


def test_the_cli_writes_chat_jsonl_to_a_path_or_a_uri(tmp_path, capsys):
    main([str(tmp_path / "a.jsonl"), "--n", "5", "--config", json.dumps(CONFIG)])
    main([f"file://{tmp_path}/b.jsonl", "--n", "5", "--config", json.dumps(CONFIG)])
    a = load_chat_jsonl(f"file://{tmp_path}/a.jsonl")
    assert a == load_chat_jsonl(f"file://{tmp_path}/b.jsonl") and len(a) == 5
    assert capsys.readouterr().out.splitlines() == [str(tmp_path / "a.jsonl"), f"file://{tmp_path}/b.jsonl"]
