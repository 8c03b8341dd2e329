"""The live stream's queries (api/views/stream.py `_db`) with a pool of connections (DB_POOL_MAX_SIZE): they
run on the event loop's executor, whose threads outnumber the pool on any host with more than 4 cores. Three
concurrent queries on three threads with a pool of 2: each thread gives its connection back after its query,
so the third gets one; a thread that kept it would leave the third waiting for the pool's 10 s, twice, then
failing (and every other request of the process with it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BASE = Path(__file__).resolve().parents[2]
PROBE = """
import asyncio, threading
from api.views.stream import _db
from django.db import connection

def query():
    with connection.cursor() as c:
        c.execute("select pg_sleep(0.3)")
    return threading.get_ident()

async def main():
    return await asyncio.gather(*[_db(query)() for _ in range(3)], return_exceptions=True)

out = asyncio.run(main())
threads = {o for o in out if isinstance(o, int)}
print("THREADS", len(threads), "ERRORS", [repr(o)[:120] for o in out if not isinstance(o, int)])
"""


def test_stream_queries_give_pooled_connections_back(db):
    r = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", PROBE],
        cwd=BASE,
        env={**os.environ, "DB_POOL_MAX_SIZE": "2", "DB_CONN_MAX_AGE": "0"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ERRORS []" in r.stdout, r.stdout
    assert "THREADS 3 " in r.stdout, r.stdout  # precondition: three threads at once, more than the pool
