"""The official `tinker` SDK's list calls (RestClient: `list_training_runs`, `list_user_checkpoints`,
`list_sessions`, `list_checkpoints`) against the live platform (ASGI app on a loopback port; no model server:
lists read PostgreSQL only), paging with the SDK's own limit/offset and cursor.

Actors: alice (owner of acme) and bob (member of acme) see acme's 3 training runs and 6 checkpoints; charlie
(owner of globex) sees only globex's. A limit over 200 is refused (400, category user)."""

from __future__ import annotations

import pytest
import tinker

from api.tinker.auth import sdk_key
from tests.api import tinker_live
from tests.api.test_tinker_objects_api import tinker_world

pytestmark = pytest.mark.django_db(transaction=True)
platform = tinker_live.platform


def test_sdk_lists_page_with_limit_and_offset(platform, alice, bob, charlie, acme, globex, make_token):
    worlds = [tinker_world(acme, alice, steps=1) for _ in range(3)]  # newest last
    theirs = tinker_world(globex, charlie, steps=1)
    models = [w["model"] for w in reversed(worlds)]

    def rest(user, org):
        key = sdk_key(make_token(user, org, scopes=["tinker"]))
        return tinker.RestClient(base_url=f"{platform}/tinker", api_key=key)

    for client in (rest(alice, acme), rest(bob, acme)):
        first = client.list_training_runs(limit=2).result()
        rest_ = client.list_training_runs(limit=2, offset=2).result()
        assert (first.cursor.total_count, first.cursor.limit, first.cursor.offset) == (3, 2, 0)
        assert [r.training_run_id for r in first.training_runs + rest_.training_runs] == models
        run = rest_.training_runs[0]
        assert (run.base_model, run.lora_rank, run.is_lora, run.model_owner) == (
            "tiny-qwen2",
            4,
            True,
            "alice",
        )
        assert run.last_checkpoint is not None and run.last_sampler_checkpoint is not None
        assert run.last_checkpoint.tinker_path == f"tinker://{models[2]}/weights/ck"
        assert run.last_sampler_checkpoint.checkpoint_type == "sampler"

        page = client.list_user_checkpoints(limit=4).result()
        tail = client.list_user_checkpoints(limit=4, offset=4).result()
        assert page.cursor is not None and page.cursor.total_count == 6
        paths = [c.tinker_path for c in page.checkpoints + tail.checkpoints]
        assert len(paths) == 6 and {p.split("/")[2] for p in paths} == set(models)

        one = client.list_checkpoints(models[0]).result()
        assert sorted(c.checkpoint_id for c in one.checkpoints) == ["sampler_weights/sw", "weights/ck"]

        every = client.list_sessions(limit=200).result().sessions
        assert every == [w["session"] for w in reversed(worlds)]
        assert client.list_sessions(limit=2, offset=1).result().sessions == every[1:3]

    outsider = rest(charlie, globex)
    runs = outsider.list_training_runs(limit=200).result()
    assert [r.training_run_id for r in runs.training_runs] == [
        theirs["model"]
    ] and runs.cursor.total_count == 1
    assert outsider.list_user_checkpoints().result().cursor.total_count == 2
    assert not {w["session"] for w in worlds} & set(outsider.list_sessions(limit=200).result().sessions)
    with pytest.raises(tinker.NotFoundError):
        outsider.list_checkpoints(models[0]).result()
    with pytest.raises(tinker.BadRequestError, match=r"limit must be in \[1, 200\]"):
        outsider.list_training_runs(limit=201).result()
