"""The model server's Valkey client: socket timeouts fitted to its lease and its blocking reads.

Without them a half-open connection (Valkey's host gone, a NAT or proxy dropping the flow) hangs the server
until its runner kills it: the lease keeper's renewal never returns, so the lease lapses while the server
still runs (another may take the base model), and the serve loop's blocking pop never wakes. With them:

- every read and write gives up after `read_s`, at most a third of the lease TTL: the keeper renews every
  third, so a hung renewal fails in time for the next try to renew before the lease lapses (after a whole TTL
  of failures the keeper declares it lost and the server stops);
- a blocking pop waits `blocking_s` at most, half of `read_s`: Valkey answers it (nil) well before the socket
  gives up, so an idle queue is never mistaken for a dead server;
- a connection idle longer than `health_check_s` is pinged before use (redis-py's health check), and TCP
  keepalive is on;
- no retries inside redis-py (its default retries a timed-out command ten times, with nested health-check
  retries: minutes against a silent server, and a re-sent claim script whose first reply was lost would move
  operations nobody reads). The keeper and the serve loop retry on their own terms.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

READ_MAX_S = 10.0  # a half-open connection is noticed within this, however long the lease
CONNECT_MAX_S = 5.0
BLOCKING_S = 1.0  # the serve loop's blocking pop, when the lease allows it


@dataclass(frozen=True)
class ValkeyTimeouts:
    connect_s: float
    read_s: float
    health_check_s: float
    blocking_s: float

    @classmethod
    def for_lease(cls, lease_ttl_s: float, blocking_s: float = BLOCKING_S) -> ValkeyTimeouts:
        if not lease_ttl_s > 0 or not blocking_s > 0:
            raise ValueError(f"the lease TTL and blocking wait must be positive: {lease_ttl_s}, {blocking_s}")
        read = min(lease_ttl_s / 3, READ_MAX_S)
        return cls(
            connect_s=min(read, CONNECT_MAX_S),
            read_s=read,
            health_check_s=read,
            blocking_s=min(blocking_s, read / 2),
        )


def valkey_client(url: str, timeouts: ValkeyTimeouts) -> redis.Redis:
    """A client for `url` with `timeouts` (options in the URL's query string take precedence)."""
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=timeouts.connect_s,
        socket_timeout=timeouts.read_s,
        socket_keepalive=True,
        health_check_interval=timeouts.health_check_s,
        retry=Retry(NoBackoff(), 0),
    )
