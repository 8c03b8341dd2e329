"""Publish the rest of the built-in environments as public packages of the `opentinker` organization.

Kept as literal data (no app imports in RunPython): the manifests name the SDK classes in
`opentinker.env.builtin`, which ship with every runtime.
"""

from django.db import migrations


def _builtin(name, entrypoint, protocol, description, tags, roles=("agent",)):
    return {
        "name": name,
        "version": "1.0.0",
        "description": description,
        "tags": tags,
        "manifest": {
            "name": name,
            "version": "1.0.0",
            "entrypoint": f"opentinker.env.builtin.{entrypoint}",
            "protocol": protocol,
            "roles": list(roles),
            "license": "Apache-2.0",
            "builtin": True,
        },
    }


BUILTINS = [
    _builtin(
        "guess-number",
        "guess_number:GuessNumberEnv",
        "multi-turn",
        "Multi-turn, data-free: find a secret number from higher/lower hints; reward 1 on the right guess.",
        ["games", "multi-turn", "data-free"],
    ),
    _builtin(
        "calculator",
        "calculator:CalculatorEnv",
        "tool-calling",
        "Tool use: answer large sums and products with a calculate() tool; reward 1 for the exact result.",
        ["math", "tool-calling", "data-free"],
    ),
    _builtin(
        "math-word",
        "math_word:MathWordEnv",
        "single-turn",
        "Math word problems from your JSONL dataset (question, answer); reward 1 for the right final number.",
        ["math", "single-turn", "dataset"],
    ),
    _builtin(
        "tic-tac-toe",
        "tictactoe:TicTacToeEnv",
        "multi-agent",
        "Two roles (x, o) on a 3x3 board: LLM vs LLM or vs a rule-based player; win +1, loss -1.",
        ["games", "multi-agent", "self-play"],
        roles=("x", "o"),
    ),
    _builtin(
        "gomoku",
        "gomoku:GomokuEnv",
        "multi-agent",
        "Five in a row on a 9x9 board, two roles: LLM vs LLM or vs a rule-based player; win +1, loss -1.",
        ["games", "multi-agent", "self-play"],
        roles=("x", "o"),
    ),
]


def fill(apps, schema_editor):
    Organization = apps.get_model("portal", "Organization")
    Package = apps.get_model("env_registry", "EnvironmentPackage")
    Version = apps.get_model("env_registry", "EnvironmentVersion")
    org = Organization.objects.get(slug="opentinker")  # created by 0002
    for b in BUILTINS:
        package, _ = Package.objects.get_or_create(
            organization=org,
            name=b["name"],
            defaults={"description": b["description"], "visibility": "public", "tags": b["tags"]},
        )
        Version.objects.get_or_create(
            package=package, version=b["version"], defaults={"manifest": b["manifest"], "status": "valid"}
        )


class Migration(migrations.Migration):
    dependencies = [("env_registry", "0002_fill_builtin_environments")]
    operations = [migrations.RunPython(fill, migrations.RunPython.noop)]
