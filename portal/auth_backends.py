"""Password sign-in for people, behind the lock-out of portal.services.throttle.

Every password check Django makes (the portal's sign-in page, the Django admin's) goes through this backend,
so none of them can be used to guess past the limit.
"""

from __future__ import annotations

from django.contrib.auth.backends import ModelBackend
from django.core.exceptions import PermissionDenied

from portal.services.audit import client_ip
from portal.services.throttle import Throttled, signin_begin, signin_end

BACKEND = "portal.auth_backends.ThrottledModelBackend"
LOCK_ATTRIBUTE = "signin_throttled"


class ThrottledModelBackend(ModelBackend):
    def authenticate(self, request, username=None, password=None, **kwargs):
        if username is None:
            username = kwargs.get("username", "")
        if request is None or username is None or password is None:
            # Not a sign-in (a management command, a program checking a password): nothing to count against.
            return super().authenticate(request, username=username, password=password, **kwargs)
        try:
            attempt = signin_begin(str(username), client_ip(request))
        except Throttled as e:
            # Tell the sign-in form why (PermissionDenied makes django.contrib.auth stop at once, checking no
            # password).
            setattr(request, LOCK_ATTRIBUTE, e)
            raise PermissionDenied(e.message) from None
        user = super().authenticate(request, username=username, password=password, **kwargs)
        signin_end(attempt, succeeded=user is not None)
        return user
