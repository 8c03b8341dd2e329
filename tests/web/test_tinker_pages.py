"""The Tinker page (/training/): an organization's sessions, training clients and saved weights, with the
adapter's files to download; and the admin console's model servers (adapters and queue depth per base model).

Actors: alice (acme's owner) and bob (teammate) see acme's objects with exact numbers; charlie (globex) sees
only his own and gets 404 for acme's session; the console answers 404 to anyone but platform staff.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from django.utils import timezone

from api.tinker import queue
from api.tinker.models import TinkerWeights
from portal.models import UsageRecord
from portal.services.usage import month_start
from tests.api.test_tinker_objects_api import ADAPTER, BASE, tinker_world
from tests.web.conftest import SCREENSHOTS
from tests.web.pages import signed_in

pytestmark = pytest.mark.django_db


@pytest.fixture
def store(settings, tmp_path):
    settings.OBJECT_STORE_URL = f"file://{tmp_path / 'objects'}"


@pytest.fixture
def staffer(make_user):
    return make_user("staffer", staff=True)


def rows(html: str, attr: str) -> list[str]:
    return re.findall(rf'<tr {attr}="([^"]+)"', html)


def test_members_see_sessions_models_and_weights(store, alice, bob, acme, charlie, globex):
    w = tinker_world(acme, alice, steps=3)
    theirs = tinker_world(globex, charlie, steps=1)
    for user in (alice, bob):
        html = signed_in(user, acme).get("/training/").content.decode()
        assert rows(html, "data-session") == [w["session"]]
        assert rows(html, "data-model") == [w["model"]]
        assert re.search(r'data-testid="steps">3<', html)
        assert (
            f"tinker://{w['model']}/weights/ck" in html
            and f"tinker://{w['model']}/sampler_weights/sw" in html
        )
        sw = TinkerWeights.objects.get(model_id=w["model"], name="sw")
        link = f"/api/v1/tinker/weights/{sw.pk}/files/adapter_model.safetensors"
        assert f'href="{link}"' in html
        # the link works from the browser's session
        got = signed_in(user, acme).get(link)
        assert got.status_code == 200 and b"".join(got.streaming_content) == ADAPTER
        assert theirs["session"] not in html and theirs["model"] not in html
    outsider = signed_in(charlie, globex)
    html = outsider.get("/training/").content.decode()
    assert rows(html, "data-session") == [theirs["session"]] and w["model"] not in html
    assert outsider.get(f"/training/?session={w['session']}").status_code == 404


def test_metered_usage_of_the_organization(store, alice, acme, charlie, globex):
    month = month_start(timezone.now())
    UsageRecord.objects.create(organization=acme, month=month, tinker_tokens=12345, model_server_seconds=36)
    UsageRecord.objects.create(organization=globex, month=month, tinker_tokens=777, model_server_seconds=1)
    html = signed_in(alice, acme).get("/training/").content.decode()
    row = html.split(f'data-month="{month:%Y-%m}"')[1].split("</tr>")[0]
    assert re.search(r'data-testid="tinker-tokens">12345<', row) and ">0.0100<" in row
    assert "777" not in html
    html = signed_in(charlie, globex).get("/training/").content.decode()
    assert re.search(r'data-testid="tinker-tokens">777<', html) and "12345" not in html


def test_session_filter_shows_only_that_sessions_objects(store, alice, acme):
    first = tinker_world(acme, alice, steps=1)
    second = tinker_world(acme, alice, steps=2)
    html = signed_in(alice, acme).get(f"/training/?session={first['session']}").content.decode()
    assert 'data-testid="session-filter"' in html
    assert rows(html, "data-model") == [first["model"]]
    assert second["model"] not in html.split('id="models-h"')[1]
    assert signed_in(alice, acme).get("/training/?session=not-a-uuid").status_code == 404


def test_console_model_servers_adapters_and_queue_depth(store, alice, acme, charlie, globex, staffer):
    a = tinker_world(acme, alice, steps=2)
    c = tinker_world(globex, charlie, steps=1)
    client = queue.client()
    client.delete(queue.ops_key(BASE))
    client.rpush(queue.ops_key(BASE), *(json.dumps({"op": "x", "n": i}) for i in range(3)))
    try:
        for user in (alice, charlie):
            assert signed_in(user).get("/console/model-servers/").status_code == 404
        html = signed_in(staffer).get("/console/model-servers/").content.decode()
    finally:
        client.delete(queue.ops_key(BASE))
    section = html.split(f'data-base="{BASE}"')[1]
    assert re.search(r'data-testid="queued">3<', section)
    assert re.search(r'data-testid="pending">2<', section)  # each world leaves one forward_backward pending
    assert a["model"] in section and c["model"] in section
    assert re.search(
        rf"<code>{re.escape(a['model'])}</code></td><td>acme</td><td class=\"num\">4</td>\s*"
        r'<td class="num">2</td><td class="num">1</td>',
        section,
    )


def test_console_says_unknown_when_valkey_does_not_answer(store, alice, acme, staffer, settings):
    tinker_world(acme, alice, steps=1)
    settings.REDIS_URL = "redis://127.0.0.1:9/0"  # the discard port: nothing listens
    html = signed_in(staffer).get("/console/model-servers/").content.decode()
    assert "unknown (Valkey did not answer)" in html
    assert re.search(r'data-testid="pending">1<', html)


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_browser_tinker_page(page, live_url, sign_in, alice, acme):
    from playwright.sync_api import expect

    # The store the server process also uses (tests/embedded_services.py's temporary OBJECT_STORE_URL).
    w = tinker_world(acme, alice, steps=3)
    month = month_start(timezone.now())
    UsageRecord.objects.create(organization=acme, month=month, tinker_tokens=4096, model_server_seconds=45)
    sign_in(alice)
    page.goto("/")
    page.get_by_role("link", name="Tinker", exact=True).click()
    expect(page.get_by_role("heading", name="Tinker sessions of Acme")).to_be_visible()
    models = page.get_by_role("table", name="Training clients")
    expect(models.locator("tbody tr")).to_have_count(1)
    expect(models.locator("tbody tr td")).to_have_text(
        [w["model"], BASE, "4", "3", "3", "1", "2", re.compile(".+")]
    )
    usage = page.get_by_role("table", name="Tinker usage per month")
    expect(usage.locator("tbody tr").first.locator("td")).to_have_text([f"{month:%Y-%m}", "4096", "0.0125"])
    weights = page.get_by_role("table", name="Saved weights")
    expect(weights.locator("tbody tr")).to_have_count(2)
    expect(weights).to_contain_text(f"tinker://{w['model']}/weights/ck")
    sampler_row = weights.locator("tbody tr").first  # newest first: the sampler adapter saved last
    expect(sampler_row.get_by_role("link")).to_have_text(
        ["adapter_config.json", "adapter_model.safetensors", "meta.json"]
    )
    with page.expect_download() as got:
        sampler_row.get_by_role("link", name="adapter_model.safetensors").click()
    assert Path(got.value.path()).read_bytes() == ADAPTER
    # The session's link filters the page to it.
    page.get_by_role("table", name="Sessions").get_by_role("link").first.click()
    expect(page.get_by_test_id("session-filter")).to_contain_text(w["session"])
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.locator("main").screenshot(path=str(SCREENSHOTS / "tinker.png"))  # docs/screenshots/tinker.png


def test_the_page_lists_storage_only_for_the_200_weights_it_shows(store, alice, acme, monkeypatch):
    from api.tinker import selectors

    w = tinker_world(acme, alice, steps=1)
    first = TinkerWeights.objects.get(model_id=w["model"], name="ck")
    TinkerWeights.objects.bulk_create(
        TinkerWeights(organization=acme, model_id=w["model"], kind="weights", name=f"x{i}", uri=first.uri)
        for i in range(205)
    )
    listed: list[int] = []
    real = selectors.weights_files

    def counted(weights):
        listed.append(weights.pk)
        return real(weights)

    monkeypatch.setattr(selectors, "weights_files", counted)  # counts the storage LISTs, still runs each
    html = signed_in(alice, acme).get("/training/").content.decode()
    shown = rows(html, "data-weights")
    assert len(shown) == 200 and sorted(map(int, shown)) == sorted(listed)


def test_console_shows_the_model_servers_allocation(store, alice, acme, staffer):
    from portal.models import Allocation, ComputePool
    from portal.services.model_servers import model_server_ensure

    tinker_world(acme, alice, steps=1)
    job, created = model_server_ensure(BASE)
    assert created and model_server_ensure(BASE) == (job, False)  # one live job per base model
    pool = ComputePool.objects.create(name="gpu-a", total_gpus=1, health=ComputePool.Health.HEALTHY)
    Allocation.objects.create(job=job, pool=pool, slots=1, launched_at=timezone.now())
    job.state = "running"
    job.save()
    html = signed_in(staffer).get("/console/model-servers/").content.decode()
    section = html.split(f'data-base="{BASE}"')[1]
    assert re.search(r'data-testid="server-state">running<', section)
    assert re.search(r'data-testid="server-pool">gpu-a<', section) and str(job.pk) in section
    assert 'data-testid="idle-since"' not in section  # a call is pending: not idle
    from api.tinker.models import TinkerFuture

    last = timezone.now().replace(microsecond=0)
    TinkerFuture.objects.update(state="done", completed_at=last)
    html = signed_in(staffer).get("/console/model-servers/").content.decode()
    idle = timezone.localtime(last).strftime("%Y-%m-%d %H:%M:%S")
    assert f'data-testid="idle-since">{idle}<' in html.split(f'data-base="{BASE}"')[1]
