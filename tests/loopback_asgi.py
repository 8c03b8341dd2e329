"""An ASGI app served by uvicorn in a thread on a free loopback port, for tests that need a real server."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import uvicorn


@contextlib.contextmanager
def serving(app) -> Iterator[str]:
    """Yields the server's base URL. The socket is bound and listening before uvicorn starts, so a client
    may connect at once (the kernel queues the connection until uvicorn accepts it): nothing polls."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", ws="auto"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        srv.should_exit = True
        thread.join(10)
        sock.close()
