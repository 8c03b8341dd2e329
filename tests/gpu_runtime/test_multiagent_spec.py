"""Multi-agent job specs: every mistake refused with a clear error before any model is loaded."""

from __future__ import annotations

import io
import json

import pytest
from pydantic import ValidationError

from gpu_runtime.cli import run_job
from gpu_runtime.controller import EXIT_FAILED
from gpu_runtime.multiagent import is_multi_agent, resolve
from gpu_runtime.sink import JsonlSink
from opentinker.spec import JobSpec

TTT = {"ref": "opentinker/tic-tac-toe@1.0.0"}


def spec(multi_agent=None, environment=TTT, **extra) -> JobSpec:
    body = {"kind": "rl", "model": {"base": "tiny-qwen2"}, "environment": environment, **extra}
    if multi_agent is not None:
        body["multi_agent"] = multi_agent
    return JobSpec.model_validate(body)


def spec_error(**kw) -> tuple[str, str]:
    with pytest.raises(ValidationError) as e:
        spec(**kw)
    (err,) = e.value.errors()
    return ".".join(map(str, err["loc"])), err["msg"]


def test_self_play_is_the_default_for_a_multi_agent_environment():
    s = spec()
    assert is_multi_agent(s)
    setup = resolve(s)
    assert setup.trained == ["main"] and setup.role_policy == {"x": "main", "o": "main"}
    assert setup.specs["main"].model.base == "tiny-qwen2" and setup.specs["main"].multi_agent is None
    assert not is_multi_agent(spec(environment={"ref": "opentinker/arithmetic@1.0.0"}))


def test_distinct_policies_get_their_own_model_and_optimizer_settings():
    s = spec(
        {
            "policies": {
                "px": {"learning_rate": 3e-4, "max_grad_norm": 0.5},
                "po": {"model": {"base": "tiny-qwen2", "lora": {"rank": 8}}},
            },
            "roles": {"o": "po", "x": "px"},
        },
        algorithm={"learning_rate": 1e-5},
    )
    setup = resolve(s)
    assert setup.trained == ["po", "px"]  # in the order the roles list them
    px, po = setup.specs["px"], setup.specs["po"]
    assert (px.algorithm.learning_rate, px.algorithm.max_grad_norm, px.model.lora) == (3e-4, 0.5, None)
    assert (po.algorithm.learning_rate, po.model.lora.rank) == (1e-5, 8)


def test_the_builtins_opponent_config_means_a_rule_based_opponent():
    setup = resolve(spec(environment={**TTT, "config": {"opponent": "rule", "role": "o"}}))
    assert setup.trained == ["main"] and setup.role_policy == {"x": None, "o": "main"}
    assert resolve(spec(environment={**TTT, "config": {"opponent": "policy"}})).role_policy == {
        "x": "main",
        "o": "main",
    }
    for config, message in [
        ({"opponent": "human"}, "opponent must be 'rule' or 'policy'"),
        ({"opponent": "rule", "role": "z"}, "tic-tac-toe has no role 'z'"),
    ]:
        with pytest.raises(ValueError, match=message):
            resolve(spec(environment={**TTT, "config": config}))
    both = spec(
        {"policies": {"p": {}}, "roles": {"x": "p", "o": "p"}},
        environment={**TTT, "config": {"opponent": "rule"}},
    )
    with pytest.raises(ValueError, match="keep multi_agent only"):
        resolve(both)


def test_a_rule_based_opponent_where_the_environment_offers_one():
    s = spec({"policies": {"me": {}, "bot": {"kind": "rule"}}, "roles": {"x": "me", "o": "bot"}})
    setup = resolve(s)
    assert setup.trained == ["me"] and setup.role_policy == {"x": "me", "o": None}


@pytest.mark.parametrize(
    ("multi_agent", "message"),
    [
        (
            {"policies": {"p": {}}, "roles": {"x": "p", "o": "p", "z": "p"}},
            "tic-tac-toe has no role 'z' (its roles: x, o)",
        ),
        ({"policies": {"p": {}}, "roles": {"x": "p"}}, "role 'o' of tic-tac-toe has no policy"),
    ],
    ids=["unknown-role", "role-without-policy"],
)
def test_roles_are_checked_against_the_environment(multi_agent, message):
    with pytest.raises(ValueError, match=r"^multi_agent\.roles: ") as e:
        resolve(spec(multi_agent))
    assert message in str(e.value)


def test_multi_agent_settings_on_a_single_agent_environment():
    s = spec(
        {"policies": {"p": {}}, "roles": {"agent": "p"}}, environment={"ref": "opentinker/arithmetic@1.0.0"}
    )
    assert is_multi_agent(s)  # routed to the multi-agent runtime, which refuses it by name
    with pytest.raises(ValueError, match=r"arithmetic@1\.0\.0 is a single-agent environment"):
        resolve(s)


@pytest.mark.parametrize(
    ("multi_agent", "loc", "message"),
    [
        (
            {"policies": {"p": {}, "q": {}}, "roles": {"x": "p", "o": "p"}},
            "multi_agent.roles",
            "policy 'q' plays no role",
        ),
        (
            {"policies": {"p": {}}, "roles": {"x": "p", "o": "nope"}},
            "multi_agent.roles",
            "role 'o' is played by 'nope', which is not in policies",
        ),
        (
            {"policies": {"b": {"kind": "rule"}}, "roles": {"x": "b", "o": "b"}},
            "multi_agent.roles",
            "at least one role needs a trained policy",
        ),
        (
            {
                "policies": {"b": {"kind": "rule", "learning_rate": 0.1}, "p": {}},
                "roles": {"x": "b", "o": "p"},
            },
            "multi_agent.policies.b",
            "a rule policy has no model",
        ),
        (
            {"policies": {"Bad Name": {}}, "roles": {"x": "Bad Name"}},
            "multi_agent.policies",
            "policy name 'Bad Name' must be",
        ),
        (
            {"policies": {"p": {"model": {"base": "gpt-17"}}}, "roles": {"x": "p"}},
            "multi_agent.policies.p.model.base",
            "unknown model 'gpt-17'",
        ),
        ({"policies": {}, "roles": {"x": "p"}}, "multi_agent.policies", "at least 1 item"),
        (
            {"policies": {"p": {}}, "roles": {"x": "p"}, "max_rounds": 0},
            "multi_agent.max_rounds",
            "greater than or equal to 1",
        ),
        (
            {"policies": {"p": {}}, "roles": {"x": "p"}, "typo": 1},
            "multi_agent.typo",
            "Extra inputs are not permitted",
        ),
    ],
    ids=[
        "policy-without-role",
        "unknown-policy",
        "all-rule",
        "rule-with-optimizer",
        "bad-name",
        "bad-model",
        "no-policies",
        "rounds",
        "extra",
    ],
)
def test_spec_level_mistakes_name_their_field(multi_agent, loc, message):
    got_loc, got_msg = spec_error(multi_agent=multi_agent)
    assert got_loc == loc and message in got_msg, (got_loc, got_msg)


def test_sft_jobs_have_no_multi_agent_settings():
    with pytest.raises(ValidationError, match="multi_agent settings are for rl and eval jobs"):
        JobSpec.model_validate(
            {
                "kind": "sft",
                "model": {"base": "tiny-qwen2"},
                "dataset": {"uri": "file:///tmp/x.jsonl"},
                "multi_agent": {"policies": {"p": {}}, "roles": {"x": "p"}},
            }
        )


def test_the_runtime_fails_a_bad_mapping_with_the_reason_and_loads_nothing():
    out = io.StringIO()
    s = spec({"policies": {"p": {}}, "roles": {"x": "p"}})
    assert run_job(s, JsonlSink(out), None) == EXIT_FAILED
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert records[-1]["event"] == "failed"
    assert records[-1]["error"] == "ValueError: multi_agent.roles: role 'o' of tic-tac-toe has no policy"
