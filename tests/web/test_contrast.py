"""Readable contrast: the portal's text colours against their backgrounds meet WCAG AA (4.5:1 for body text),
computed from frontend/src/app.css itself, so a colour change that hurts legibility fails here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

CSS = (Path(__file__).resolve().parents[2] / "frontend" / "src" / "app.css").read_text()
VARS = dict(re.findall(r"--([a-z]+):\s*(#[0-9a-fA-F]{6})", CSS))


def colour(value: str) -> str:
    return VARS[value[2:]] if value.startswith("--") else value


def luminance(hex_colour: str) -> float:
    def channel(c: int) -> float:
        s = c / 255
        return s / 12.92 if s <= 0.03928 else ((s + 0.055) / 1.055) ** 2.4

    r, g, b = (int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))
    return 0.2126 * channel(r) + 0.7152 * channel(g) + 0.0722 * channel(b)


def ratio(fg: str, bg: str) -> float:
    hi, lo = sorted((luminance(colour(fg)), luminance(colour(bg))), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def rule(selector: str) -> str:
    m = re.search(re.escape(selector) + r"\s*\{([^}]*)\}", CSS)
    assert m, selector
    return m[1]


def declared(selector: str, prop: str) -> str:
    m = re.search(rf"(?<![-\w]){prop}:\s*(var\(--[a-z]+\)|#[0-9a-fA-F]{{6}})", rule(selector))
    assert m, (selector, prop)
    value = m[1]
    return "--" + value[6:-1] if value.startswith("var(") else value


PAIRS = [
    ("body text", "--ink", "--bg"),
    ("muted text", "--muted", "--bg"),
    ("muted text on cards", "--muted", "--card"),
    ("links", "--link", "--bg"),
    ("errors", "--bad", "--card"),
    ("header", "#ffffff", "--brand"),
    ("buttons", "#ffffff", "--brand"),
    ("danger buttons", "#ffffff", "--bad"),
    ("secrets and logs", "#f9fafb", "#111827"),
]
RULES = [
    ".state-running, .state-admitted",
    ".state-succeeded",
    ".state-failed",
    ".state-queued, .state-cancelling",
    ".messages li.error",
    ".messages li.success",
    ".messages li.warning",
]


@pytest.mark.parametrize(("what", "fg", "bg"), PAIRS)
def test_text_colours_meet_wcag_aa(what, fg, bg):
    assert ratio(fg, bg) >= 4.5, f"{what}: {ratio(fg, bg):.2f}:1"


@pytest.mark.parametrize("selector", RULES)
def test_badges_and_messages_meet_wcag_aa(selector):
    fg, bg = declared(selector, "color"), declared(selector, "background")
    assert ratio(fg, bg) >= 4.5, f"{selector}: {ratio(fg, bg):.2f}:1"


def test_the_ratio_is_computed_right():
    assert ratio("#000000", "#ffffff") == pytest.approx(21.0)
    assert ratio("#777777", "#ffffff") == pytest.approx(4.48, abs=0.01)  # the classic just-failing grey
