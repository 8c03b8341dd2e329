"""Guess the number: multi-turn, data-free.

Card: a secret integer in ``[low, high]`` (config, default 1-100) is drawn from the seed. Each turn the agent
guesses; the environment answers "higher" or "lower". Reward 1.0 on the turn of the correct guess, 0.0 on
every other turn; after ``max_guesses`` (default 7) wrong guesses the episode ends with 0. A turn without an
integer counts as a guess and is answered with a reminder of the format.
"""

from __future__ import annotations

import random
from typing import Any

from opentinker.env.base import Environment, Observation, StepResult
from opentinker.env.builtin.arithmetic import first_integer


class GuessNumberEnv(Environment):
    name = "guess-number"
    system_prompt = "Find the secret number. Answer each turn with one integer guess."

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        self.low = int(config.get("low", 1))
        self.high = int(config.get("high", 100))
        self.max_guesses = int(config.get("max_guesses", 7))
        if self.low > self.high or self.max_guesses < 1:
            raise ValueError("need low <= high and max_guesses >= 1")
        self.secret: int | None = None
        self.guesses = 0

    def reset(self, seed: int) -> Observation:
        self.secret = random.Random(seed).randint(self.low, self.high)  # noqa: S311 (reproducible, not secret)
        self.guesses = 0
        return Observation(
            f"I picked an integer between {self.low} and {self.high}. "
            f"You have {self.max_guesses} guesses. What is your first guess?"
        )

    def step(self, action: str) -> StepResult:
        if self.secret is None:
            raise RuntimeError("step() before reset()")
        self.guesses += 1
        guess = first_integer(action)
        info = {"guesses": self.guesses, "secret": self.secret}
        if guess == self.secret:
            return StepResult(None, 1.0, True, {**info, "solved": True})
        if self.guesses >= self.max_guesses:
            return StepResult(None, 0.0, True, {**info, "solved": False})
        if guess is None:
            hint = "Please answer with a single integer."
        else:
            low = guess < self.secret
            hint = f"{guess} is too {'low' if low else 'high'}. Guess {'higher' if low else 'lower'}."
        left = self.max_guesses - self.guesses
        return StepResult(Observation(f"{hint} {left} guesses left."), 0.0, False, info)
