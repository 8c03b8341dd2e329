"""Sign in, sign up (a user and their first organization), sign out."""

from __future__ import annotations

from django import forms
from django.contrib import messages
from django.contrib.auth import login
from django.contrib.auth import views as auth_views
from django.contrib.auth.forms import AuthenticationForm
from django.core.exceptions import ValidationError
from django.shortcuts import redirect, render
from django.views.decorators.http import require_http_methods

from portal.auth_backends import BACKEND, LOCK_ATTRIBUTE
from portal.errors import DomainError
from portal.services.accounts import user_signup
from portal.services.audit import client_ip
from portal.services.throttle import Throttled, signup_check
from portal.web.forms import add_domain_error
from portal.web.tenancy import select_organization


class SignupForm(forms.Form):
    username = forms.CharField(max_length=150, widget=forms.TextInput(attrs={"autocomplete": "username"}))
    email = forms.EmailField(max_length=254, widget=forms.EmailInput(attrs={"autocomplete": "email"}))
    password = forms.CharField(
        min_length=1,
        max_length=128,
        widget=forms.PasswordInput(attrs={"autocomplete": "new-password"}),
        help_text="At least 10 characters, not only digits, not a common password.",
    )
    org_name = forms.CharField(label="Organization name", max_length=100)
    org_slug = forms.SlugField(
        label="Organization id",
        max_length=40,
        help_text="Lowercase letters, digits and dashes; used in URLs and environment names.",
    )


class ThrottledAuthenticationForm(AuthenticationForm):
    """Says so when the sign-in was refused by the lock-out (portal.auth_backends), not by the password."""

    def clean(self):
        try:
            return super().clean()
        except ValidationError:
            throttled = getattr(self.request, LOCK_ATTRIBUTE, None)
            if throttled is not None:
                raise ValidationError(throttled.message, code="throttled") from None
            raise


class LoginView(auth_views.LoginView):
    form_class = ThrottledAuthenticationForm
    redirect_authenticated_user = True

    def get_context_data(self, **kwargs):
        return super().get_context_data(throttled=getattr(self.request, LOCK_ATTRIBUTE, None), **kwargs)

    def form_invalid(self, form):
        response = super().form_invalid(form)
        throttled = getattr(self.request, LOCK_ATTRIBUTE, None)
        if throttled is not None:
            response.status_code = 429
            response["Retry-After"] = str(throttled.retry_after)
        return response


login_view = LoginView.as_view()
logout_view = auth_views.LogoutView.as_view()


@require_http_methods(["GET", "POST"])
def signup(request):
    if request.user.is_authenticated:
        return redirect("home")
    form = SignupForm(request.POST or None)
    if request.method == "POST":
        try:
            signup_check(client_ip(request))
        except Throttled as e:
            form.is_valid()
            form.add_error(None, e.message)
            response = render(request, "registration/signup.html", {"form": form}, status=429)
            response["Retry-After"] = str(e.retry_after)
            return response
    if request.method == "POST" and form.is_valid():
        d = form.cleaned_data
        try:
            user, org = user_signup(
                username=d["username"],
                email=d["email"],
                password=d["password"],
                org_slug=d["org_slug"],
                org_name=d["org_name"],
            )
        except DomainError as e:
            add_domain_error(form, e, fields={"slug": "org_slug", "name": "org_name"})
        else:
            login(request, user, backend=BACKEND)
            select_organization(request, user.memberships.select_related("organization").get())
            messages.success(request, f"Welcome! You own the organization {org.name}.")
            return redirect("home")
    return render(request, "registration/signup.html", {"form": form}, status=400 if form.errors else 200)
