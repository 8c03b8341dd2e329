"""Write an SFT dataset of board games (tic-tac-toe, gomoku) played by the rule-based player (chat JSONL).

A warm start on it teaches a policy to answer with legal moves, so a multi-agent RL job starts from games
that last (a random-init model forfeits at once and its opponent never moves):

    python -m gpu_runtime.data.board_sft out.jsonl --game tic-tac-toe --n 2000 --seed 0 \\
        --config '{"opening": 2, "prompt_style": "compact"}'

Each example is one role's whole conversation in one game: the game's seed (its random opening), a seat
(X and O alternate), the student's moves by the environment's rule-based player, its opponent's moves by the
rule-based player or, with probability `noise` per move, a random legal move (so the student sees positions
the rule player alone never reaches). The conversation is recorded by running the game through the same
`MultiAgentProtocol` the multi-agent rollout uses, with a codec that keeps the messages it is asked to
encode: the system prompt, the first observations, each follow-up exactly as the coordinator merges it. The
chat template then renders precisely the tokens a rollout of the same game holds (a test checks it), and
the loss mask covers exactly the tokens the policy generates.

`out` may also be an object-store URI (`file://...` or `s3://...`, endpoint from AWS_ENDPOINT_URL), as for
`gpu_runtime.data.arithmetic_sft`. Use the RL job's environment config (`opening`, `prompt_style`, `size`).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

from opentinker.env.builtin import BUILTINS
from opentinker.env.builtin.board import KInARow
from opentinker.env.multiagent import MultiAgentProtocol, RulePolicy
from opentinker.env.protocol import Budget, Message, StopReason

_END = 257  # the recorder's end-of-turn id (any id above the byte range)


class _Recorder:
    """A chat codec that records the messages the protocol renders; ids are the text's bytes."""

    stop_ids = frozenset([_END])

    def __init__(self) -> None:
        self.messages: list[Message] = []

    def encode_prompt(self, messages: list[Message], tools: list[dict[str, Any]] | None = None) -> list[int]:
        self.messages += [{"role": m["role"], "content": m["content"]} for m in messages]
        return [0]

    def encode_followup(self, message: Message, *, closed: bool) -> list[int]:
        self.messages.append({"role": message["role"], "content": message["content"]})
        return [0]

    def decode(self, token_ids: list[int]) -> str:
        return bytes(t for t in token_ids if t < 256).decode()


def _random_legal(rng: random.Random, env: KInARow) -> str:
    free = [(r, c) for r in range(env.n) for c in range(env.n) if env.board[r][c] == "."]
    r, c = rng.choice(free)
    return f"{r + 1} {c + 1}"


def board_conversation(
    game: str, seed: int, student: str, *, noise: float, rng: random.Random, **config: Any
) -> list[Message]:
    """One game of `game` from `seed`: the conversation of role `student`, which the rule-based player plays;
    the other role plays by rule, or a random legal move with probability `noise`."""
    env = BUILTINS[game](**config)
    if not isinstance(env, KInARow):
        raise ValueError(f"{game} is not a board game with a rule-based player")
    recorder = _Recorder()

    def student_move(ids: list[int], max_new: int) -> list[int]:
        move = env.rule_based_action(student)
        recorder.messages.append({"role": "assistant", "content": move})
        return [*move.encode(), _END]

    def opponent(env_: Any, role: str) -> str:
        return _random_legal(rng, env_) if rng.random() < noise else env_.rule_based_action(role)

    players = {r: student_move if r == student else RulePolicy(opponent) for r in env.roles}
    budget = Budget(max_turns=env.n * env.n + 1, max_new_tokens=64, max_context=1 << 20)
    played = MultiAgentProtocol(budget).run(env, players, recorder, seed)
    if played.stop_reason is not StopReason.DONE:
        raise RuntimeError(f"{game} seed {seed}: game ended {played.stop_reason} ({played.error})")
    return recorder.messages


def board_conversations(
    n: int, *, game: str = "tic-tac-toe", seed: int = 0, noise: float = 0.5, **config: Any
) -> list[list[Message]]:
    """`n` conversations, seats alternating (X, O, X, ...), game seeds drawn from `seed`. A conversation in
    which the student never moved (the opponent won first) is skipped: it has nothing to learn."""
    roles = BUILTINS[game].roles
    rng = random.Random(seed)  # noqa: S311 (reproducible data, not secrets)
    out: list[list[Message]] = []
    i = 0
    while len(out) < n:
        msgs = board_conversation(
            game, rng.randrange(2**31), roles[i % len(roles)], noise=noise, rng=rng, **config
        )
        i += 1
        if any(m["role"] == "assistant" for m in msgs):
            out.append(msgs)
    return out


def board_sft_jsonl(
    n: int, *, game: str = "tic-tac-toe", seed: int = 0, noise: float = 0.5, **config: Any
) -> bytes:
    """The dataset as chat JSONL, one {"messages": [...]} per line."""
    conversations = board_conversations(n, game=game, seed=seed, noise=noise, **config)
    return "".join(json.dumps({"messages": msgs}) + "\n" for msgs in conversations).encode()


def write_board_sft(
    path: str | Path, n: int, *, game: str = "tic-tac-toe", seed: int = 0, noise: float = 0.5, **config: Any
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(board_sft_jsonl(n, game=game, seed=seed, noise=noise, **config))
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m gpu_runtime.data.board_sft")
    p.add_argument("out", help="a file path, or a file:// or s3:// URI")
    p.add_argument("--game", default="tic-tac-toe", help="a built-in board game: tic-tac-toe or gomoku")
    p.add_argument("--n", type=int, default=2000, help="conversations (one role's game each)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise", type=float, default=0.5, help="the opponent's chance of a random legal move")
    p.add_argument("--config", default="{}", help="the game's environment config as JSON")
    args = p.parse_args(argv)
    config = json.loads(args.config)
    kw = dict(game=args.game, seed=args.seed, noise=args.noise, **config)
    if "://" in args.out:
        from gpu_runtime import storage

        storage.write_bytes(args.out, board_sft_jsonl(args.n, **kw))
        print(args.out)
    else:
        print(write_board_sft(args.out, args.n, **kw))


if __name__ == "__main__":
    main()
