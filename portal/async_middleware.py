"""Middleware that serves Django's async handler (ASGI) on the event loop, without hopping to a thread.

Under ASGI, Django adapts a sync-only middleware by running the chain from it outwards in a thread and the
rest back on the loop (two hops); and Django's own ``MiddlewareMixin`` middlewares, though async-capable,
send each ``process_request`` / ``process_response`` / ``process_view`` hook to a thread (a hop each). With
every middleware here, a sync view costs the one hop Django makes for the view itself, and an async view
(the Tinker API's long-polled ``retrieve_future``) none.

- ``DualMiddleware``: the base of our own middlewares; they write their steps once and call them from both
  ``__call__`` (WSGI, the test client) and ``__acall__`` (ASGI).
- Django's middlewares whose hooks do no I/O, run inline on the loop (``InlineHooks``); where a hook may do
  I/O (a session to save, messages to store, a CSRF check that reads the form body), it still goes to a
  thread, as Django would send it. On the sync handler each behaves exactly as its parent.
- WhiteNoise (6.12, sync-only): the path lookup inline; opening and serving a static file in a thread.

Django's deploy checks look for its middlewares by dotted path: ``deploy_checks_see_subclasses`` (called
when the portal app is ready) lets them find these subclasses, so ``check --deploy`` still checks HSTS,
secure cookies and the rest.
"""

from __future__ import annotations

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.conf import settings
from django.contrib.auth.middleware import AuthenticationMiddleware
from django.contrib.messages.middleware import MessageMiddleware
from django.contrib.sessions.middleware import SessionMiddleware
from django.middleware.clickjacking import XFrameOptionsMiddleware
from django.middleware.common import CommonMiddleware
from django.middleware.csrf import CsrfViewMiddleware
from django.middleware.security import SecurityMiddleware
from django.utils.deprecation import MiddlewareMixin
from django.utils.module_loading import import_string
from whitenoise.middleware import WhiteNoiseMiddleware

SAFE_METHODS = ("GET", "HEAD", "OPTIONS", "TRACE")


class DualMiddleware:
    """Django's sync-and-async middleware pattern: ``__call__`` for the sync handler, ``__acall__`` (which
    a subclass writes) when the handler below is async."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response):
        self.get_response = get_response
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    def __call__(self, request):
        if iscoroutinefunction(self):
            return self.__acall__(request)
        return self.call(request)

    def call(self, request):
        raise NotImplementedError

    async def __acall__(self, request):
        raise NotImplementedError


class InlineHooks:
    """For a ``MiddlewareMixin`` subclass: on the async handler, run its hooks on the loop, except where
    ``response_needs_thread`` says that ``process_response`` may do I/O."""

    def response_needs_thread(self, request, response) -> bool:
        return False

    async def __acall__(self, request):
        response = None
        if hasattr(self, "process_request"):
            response = self.process_request(request)
        response = response or await self.get_response(request)
        if hasattr(self, "process_response"):
            if self.response_needs_thread(request, response):
                response = await sync_to_async(self.process_response)(request, response)
            else:
                response = self.process_response(request, response)
        return response


class AsyncSecurityMiddleware(InlineHooks, SecurityMiddleware):
    pass


class AsyncCommonMiddleware(InlineHooks, CommonMiddleware):
    pass


class AsyncXFrameOptionsMiddleware(InlineHooks, XFrameOptionsMiddleware):
    pass


class AsyncAuthenticationMiddleware(InlineHooks, AuthenticationMiddleware):
    """Sets the lazy ``request.user``; the user is loaded (in a thread) only when read."""


class AsyncSessionMiddleware(InlineHooks, SessionMiddleware):
    """Creating the session store reads nothing; the session is loaded only when read. Once read or
    written, saving it and its cookie go to a thread."""

    def response_needs_thread(self, request, response) -> bool:
        session = getattr(request, "session", None)
        return session is not None and (
            session.accessed or session.modified or settings.SESSION_SAVE_EVERY_REQUEST
        )


class AsyncMessageMiddleware(InlineHooks, MessageMiddleware):
    """Storing messages may write the session: in a thread, and only when messages were read or added."""

    def response_needs_thread(self, request, response) -> bool:
        storage = getattr(request, "_messages", None)
        return storage is not None and (storage.used or storage.added_new)


class AsyncCsrfViewMiddleware(InlineHooks, CsrfViewMiddleware):
    """The token check of an unsafe request reads the form body (maybe a spooled file): in a thread. Safe
    methods and exempt views (the API's) are decided inline. With CSRF_USE_SESSIONS (the token in the
    session, which reading may load), every hook goes to a thread, as Django's own middleware does."""

    def __init__(self, get_response):
        super().__init__(get_response)
        if iscoroutinefunction(self) and not settings.CSRF_USE_SESSIONS:
            # Django takes process_view from the instance and sends a sync one to a thread.
            self.process_view = self._aprocess_view

    async def __acall__(self, request):
        if settings.CSRF_USE_SESSIONS:
            return await MiddlewareMixin.__acall__(self, request)
        return await super().__acall__(request)

    async def _aprocess_view(self, request, callback, callback_args, callback_kwargs):
        check = super().process_view
        if request.method in SAFE_METHODS or getattr(callback, "csrf_exempt", False):
            return check(request, callback, callback_args, callback_kwargs)
        return await sync_to_async(check)(request, callback, callback_args, callback_kwargs)


class AsyncWhiteNoiseMiddleware(WhiteNoiseMiddleware):
    """WhiteNoise's own serving (same files, same headers), reached from the async handler too."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response=None, settings=settings):
        super().__init__(get_response, settings)
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    def __call__(self, request):
        if iscoroutinefunction(self):
            return self.__acall__(request)
        return super().__call__(request)

    async def __acall__(self, request):
        if self.autorefresh:  # development: finding a file stats the disk
            static_file = await sync_to_async(self.find_file)(request.path_info)
        else:
            static_file = self.files.get(request.path_info)
        if static_file is not None:
            return await sync_to_async(self.serve)(static_file, request)  # opens the file
        return await self.get_response(request)


def _uses(cls: type) -> bool:
    return any(issubclass(import_string(path), cls) for path in settings.MIDDLEWARE)


def deploy_checks_see_subclasses() -> None:
    """Django's security checks test ``"django.middleware.security.SecurityMiddleware" in MIDDLEWARE`` (and
    likewise X-Frame-Options, CSRF, sessions): with the subclasses above they would warn that each is
    missing and skip every check gated on it. Make them accept a subclass, as Django's admin checks do."""
    from django.core.checks.security import base, csrf, sessions

    base._security_middleware = lambda: _uses(SecurityMiddleware)
    base._xframe_middleware = lambda: _uses(XFrameOptionsMiddleware)
    csrf._csrf_middleware = lambda: _uses(CsrfViewMiddleware)
    sessions._session_middleware = lambda: _uses(SessionMiddleware)
