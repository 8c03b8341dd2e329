"""Held `retrieve_future` polls leave the web worker to everyone else (issue 16: "asynchronous where requests
wait"). A real uvicorn worker on the test database with a pool of 2 PostgreSQL connections (DB_POOL_MAX_SIZE,
as the production server pools them): 6 polls held at once, more than the pool holds. While they wait, a
plain API request and a probe are answered; once the futures are written, every held poll answers with its
outcome, long before its hold would have ended.

What a held poll must not keep is its database connection (api/tinker/views.py gives it back before the
hold): without that, the third poll already waits for a connection the first two keep for their whole hold,
and so does everything else in the worker (psycopg's pool gives up after 10 s: 500s). Threads are not the
limit here: Django gives every ASGI request a thread of its own (asgiref's per-request
ThreadSensitiveContext), parked while the poll waits, with the middleware chain on the event loop
(portal/async_middleware.py) or in that thread alike; tests/portal/test_async_middleware.py pins the chain.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import redis
from django.conf import settings

from api.tinker import queue, services
from api.tinker.auth import sdk_key
from api.tinker.models import TinkerFuture, TinkerModel, TinkerSession
from tests.api.test_stream import running_uvicorn
from tests.workers.test_local_driver import wait_for

pytestmark = pytest.mark.django_db(transaction=True)
BASE = "tiny-qwen2"
POLLS = 6
POOL = 2
HOLD = 40  # seconds (the setting's maximum); every answer below is expected long before it
ANSWER = 30  # the clients' read timeout: a poll that only ends with its hold fails the test


# Django's ASGI handler (the demo's server), and the production server's split application (sync views on a
# pool of DB_POOL_MAX_SIZE threads through the WSGI handler, the held polls on the loop: they share the pool).
@pytest.mark.parametrize("app", ["portal.asgi:application", "portal.asgi_split:application"])
def test_held_polls_leave_the_worker_to_other_requests(alice, acme, make_token, app):
    session = TinkerSession.objects.create(organization=acme, created_by=alice)
    model = TinkerModel.objects.create(
        pk=f"{session.pk}:train:0", organization=acme, session=session, kind="train", base_model=BASE
    )
    futures = [
        TinkerFuture.objects.create(organization=acme, model=model, operation="optim_step", seq_id=n)
        for n in range(1, POLLS + 1)
    ]
    key = sdk_key(make_token(alice, acme, scopes=["tinker"]))
    api_token = make_token(alice, acme, scopes=["jobs:read"])
    channels = [queue.done_channel(str(f.pk)) for f in futures]
    valkey = redis.Redis.from_url(settings.REDIS_URL)
    env = {"DB_POOL_MAX_SIZE": str(POOL), "DB_CONN_MAX_AGE": "0", "TINKER_POLL_HOLD_SECONDS": str(HOLD)}
    with running_uvicorn(app=app, **env) as url, ThreadPoolExecutor(POLLS) as pool:

        def poll(future: TinkerFuture) -> httpx.Response:
            return httpx.post(
                f"{url}/tinker/api/v1/retrieve_future",
                json={"request_id": str(future.pk)},
                headers={"X-API-Key": key},
                timeout=httpx.Timeout(10, read=ANSWER),
            )

        polls = [pool.submit(poll, f) for f in futures]

        def held() -> bool:
            done = [p for p in polls if p.done()]
            assert not done, f"a poll ended before its future was written: {done[0].result().text[:300]}"
            return all(n == 1 for _, n in valkey.pubsub_numsub(*channels))

        # Each poll subscribes to its future's channel only after it has authenticated and read its row.
        wait_for(held, timeout=ANSWER, what=f"{POLLS} polls held")

        # (a) the worker still serves: a DRF view that queries the database, and the liveness probe.
        jobs = httpx.get(
            f"{url}/api/v1/jobs", headers={"Authorization": f"Bearer {api_token}"}, timeout=ANSWER
        )
        assert jobs.status_code == 200, jobs.text[:500]
        assert jobs.json()["results"] == []
        assert httpx.get(f"{url}/healthz", timeout=ANSWER).status_code == 200
        assert not any(p.done() for p in polls)  # still held while those were served

        # (b) writing the outcomes wakes every held poll with its own outcome.
        for n, future in enumerate(futures):
            services.future_complete(BASE, str(future.pk), result={"metrics": {"step:sum": float(n)}})
        answers = [p.result() for p in polls]
    assert [a.status_code for a in answers] == [200] * POLLS, [a.text[:200] for a in answers]
    assert [a.json() for a in answers] == [{"metrics": {"step:sum": float(n)}} for n in range(POLLS)]
