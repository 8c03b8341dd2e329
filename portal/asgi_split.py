"""The production ASGI application: async views on the event loop, every other request through Django's WSGI
handler on a fixed pool of threads (deploy/web.py serves `portal.asgi_split:application`).

Why: Django's ASGI handler runs a sync view in a new thread per request (a `ThreadSensitiveContext` per
request gets its own one-thread executor) and hops between the event loop and that thread at every sync/async
boundary of the middleware chain; measured under load, that costs the worker about as much CPU as the view
itself (README "Performance"). Django's WSGI handler runs the same middleware and views in one call on a
thread that lives on, with its database connection from the process's pool, so a plain API request costs one
hand-off from the loop to a pool thread and one back.

Which requests stay on the loop: those whose view is async (a coroutine function, or a class-based view
whose handlers are async: Tinker's long-polled `retrieve_future`), and those whose view sets
`asgi_only = True` (the live stream, a sync view that answers an async generator). Neither may hold a thread
while it waits; every other route may, for as long as its request runs. Anything that is not an HTTP request
(lifespan, websocket) goes to Django's ASGI handler as before.
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

from asgiref.sync import iscoroutinefunction
from django.conf import settings
from django.core.asgi import get_asgi_application
from django.core.handlers.asgi import ASGIHandler
from django.core.wsgi import get_wsgi_application
from django.http import FileResponse
from django.urls import Resolver404, get_resolver

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")

# How many requests of one process run their sync views at once without a pool (the demo's settings); with
# one, as many threads as pooled connections (DB_POOL_MAX_SIZE): a thread holds one while its request runs.
THREADS_WITHOUT_POOL = 8
# A request body up to this size stays in memory, a larger one goes to a temporary file (as Django's handler).
BODY_MEMORY = 1024 * 1024


def _wants_loop(path: str, resolver: Any) -> bool:
    try:
        match = resolver.resolve(path)
    except Resolver404:
        return False  # Django's 404 page is a plain response
    func = match.func
    view_class = getattr(func, "view_class", None) or getattr(func, "cls", None)
    if getattr(func, "asgi_only", False) or getattr(view_class, "asgi_only", False):
        return True
    if iscoroutinefunction(func):
        return True
    return bool(view_class is not None and getattr(view_class, "view_is_async", False))


def _path_info(scope: dict[str, Any]) -> str:
    """The path below the root path (uvicorn's --root-path): what Django's URLconf resolves. ASGI's `path`
    includes the root path."""
    root, path = scope.get("root_path", ""), scope["path"]
    return path[len(root) :] if root and path.startswith(root) else path


def _refused_unread(scope: dict[str, Any]) -> bool:
    """Whether the API's guard refuses this request by its declared length (413): then its body is not read.
    Django's handlers read a whole body before any middleware sees the request, so a request declaring
    gigabytes would be written to a temporary file first; the guard answers it from the headers alone."""
    declared = next((value for name, value in scope.get("headers", ()) if name == b"content-length"), b"")
    if not declared.isdigit() or int(declared) <= settings.API_MAX_BODY_BYTES:
        return False  # the common case: nothing more to look at
    root = scope.get("root_path", "")
    request = SimpleNamespace(
        path=root + _path_info(scope),
        method=scope["method"].upper(),
        META={"CONTENT_LENGTH": declared.decode("latin-1")},
    )
    return refusal(request) is not None


def _environ(scope: dict[str, Any], body: Any, size: int = 0) -> dict[str, Any]:
    """The WSGI environ of an HTTP scope whose whole body (`size` bytes) is in the file `body`."""
    root = scope.get("root_path", "")
    path = _path_info(scope)
    server = scope.get("server") or ("localhost", 80)
    client = scope.get("client") or ("", 0)
    environ: dict[str, Any] = {
        "REQUEST_METHOD": scope["method"],
        # WSGI carries the path as the latin-1 reading of its bytes; Django decodes it back as UTF-8.
        "SCRIPT_NAME": root.encode().decode("latin-1"),
        "PATH_INFO": path.encode().decode("latin-1"),
        "QUERY_STRING": scope.get("query_string", b"").decode("latin-1"),
        "SERVER_NAME": str(server[0]),
        "SERVER_PORT": str(server[1] if server[1] is not None else 80),
        "SERVER_PROTOCOL": "HTTP/" + scope.get("http_version", "1.1"),
        "REMOTE_ADDR": client[0],
        "REMOTE_PORT": str(client[1]),
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scope.get("scheme", "http"),
        "wsgi.input": body,
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }
    for raw_name, raw_value in scope.get("headers", ()):
        if b"_" in raw_name:
            # As Django's ASGI handler: `X_Forwarded_Proto` would read as X-Forwarded-Proto, a client's spoof
            # of what the proxy sets (SECURE_PROXY_SSL_HEADER; X-Forwarded-For for the audit's address).
            continue
        name = raw_name.decode("latin-1").upper().replace("-", "_")
        value = raw_value.decode("latin-1")
        key = name if name in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + name
        environ[key] = environ[key] + "," + value if key in environ else value
    if size and "CONTENT_LENGTH" not in environ:
        # A chunked body has no Content-Length, and Django's WSGI request reads exactly CONTENT_LENGTH bytes
        # (none without it); the whole body is here, so its length is known. The API still refuses chunked
        # bodies (411, api.middleware: it looks at Transfer-Encoding first).
        environ["CONTENT_LENGTH"] = str(size)
    return environ


class SplitApplication:
    """HTTP requests for sync views to Django's WSGI handler on a thread pool, the rest to its ASGI one."""

    def __init__(self, threads: int = 0) -> None:
        self.asgi = get_asgi_application()
        self.wsgi = get_wsgi_application()
        self.resolver = get_resolver()
        threads = threads or settings.DB_POOL_MAX_SIZE or THREADS_WITHOUT_POOL
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="wsgi")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or _wants_loop(_path_info(scope), self.resolver):
            await self.asgi(scope, receive, send)
            return
        body = tempfile.SpooledTemporaryFile(max_size=BODY_MEMORY, mode="w+b")  # noqa: SIM115 (closed below)
        size = 0
        watch = None
        try:
            while not _refused_unread(scope):
                message = await receive()
                if message["type"] == "http.disconnect":
                    return  # the client left before its request was complete: nothing to answer
                size += body.write(message.get("body", b""))
                if not message.get("more_body", False):
                    break
            body.seek(0)
            loop = asyncio.get_running_loop()
            # After the whole body, receive() answers only when the client leaves (or the response is done).
            # uvicorn drops what is sent to a closed connection without an error, so a streaming response
            # (the audit export, a download) would run to its end on a pool thread, holding it and its
            # database connection: the thread stops at the next chunk instead, as Django's ASGI handler does.
            gone = threading.Event()
            watch = asyncio.ensure_future(receive())
            watch.add_done_callback(lambda _task: gone.set())
            environ = _environ(scope, body, size)
            done = await loop.run_in_executor(self.pool, self._run, environ, send, loop, gone)
            if done is not None:
                status, headers, content = done
                await send({"type": "http.response.start", "status": status, "headers": headers})
                await send({"type": "http.response.body", "body": content})
        finally:
            if watch is not None:
                watch.cancel()
            body.close()

    def _run(self, environ, send, loop, gone=None):
        """On a pool thread: the whole WSGI call, the response's close() included (it ends the request for
        Django: signals, the database connection back to the pool). A plain response comes back whole, to be
        sent from the loop; a streaming one is sent from here, chunk by chunk, each send awaited."""
        started: list[Any] = []

        def start_response(status, headers, exc_info=None):
            started[:] = [
                int(status.split(" ", 1)[0]),
                [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
            ]

        result = self.wsgi(environ, start_response)
        try:
            if not getattr(result, "streaming", False):
                return started[0], started[1], b"".join(result)

            if isinstance(result, FileResponse):
                # Django's 4 KiB reads would each cost a hop to the loop and back (a checkpoint download: a
                # million of them per 4 GiB); Django's ASGI handler reads its chunk size, so does this.
                result.block_size = ASGIHandler.chunk_size

            def push(message):
                asyncio.run_coroutine_threadsafe(send(message), loop).result()

            push({"type": "http.response.start", "status": started[0], "headers": started[1]})
            for chunk in result:
                if gone is not None and gone.is_set():
                    break  # the client left: close() below ends the response's iterator
                if chunk:
                    push({"type": "http.response.body", "body": chunk, "more_body": True})
            else:
                push({"type": "http.response.body", "body": b""})
            return None
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()


application = SplitApplication()

# The API's guard, read by _refused_unread (its module needs the apps that SplitApplication() has loaded).
from api.middleware import refusal  # noqa: E402

# The web server refuses to start without the pages' built scripts and styles (see portal/web/checks.py).
from portal.web.checks import require_bundle  # noqa: E402 (needs the settings configured above)

require_bundle()

# The ~140,000 objects that Django, the apps and the URLconf leave behind live as long as the process: out of
# the collector's reach, a full collection walks only what requests left (~25,000), ~10 ms instead of ~80-150
# on 2 shared cores, and every request of the worker waits for it (README "Performance").
gc.collect()
gc.freeze()
