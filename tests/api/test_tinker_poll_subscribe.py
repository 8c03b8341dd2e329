"""retrieve_future's long-poll is subscribed, confirmed by Valkey, before it reads the future's row (the
reviewer's C5): redis-py's subscribe() only sends the command, so an outcome announced right after the row
was read could be missed and the poll would sit out its whole hold. Real Valkey."""

from __future__ import annotations

import asyncio

import pytest
import redis
import redis.asyncio as aioredis

from api.tinker import views

pytestmark = pytest.mark.django_db  # the services (Valkey) come with the database fixtures


def test_subscribe_returns_once_valkey_has_the_subscription(settings):
    channel = "tinker:done:test-subscribe"
    publisher = redis.Redis.from_url(settings.REDIS_URL)

    async def poll() -> dict:
        r = aioredis.Redis.from_url(settings.REDIS_URL)
        try:
            async with r.pubsub() as pubsub:
                await views.subscribe(pubsub, channel, 30)
                assert publisher.pubsub_numsub(channel) == [(channel.encode(), 1)]
                publisher.publish(channel, b"1")
                # The confirmation is consumed: the next message is the announcement itself.
                return await pubsub.get_message(timeout=30)
        finally:
            await r.aclose()

    message = asyncio.run(poll())
    assert message is not None and message["type"] == "message" and message["data"] == b"1"
