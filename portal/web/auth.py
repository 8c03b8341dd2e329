"""Sign in, sign up (a user and their first organization), sign out."""

from __future__ import annotations

from django import forms
from django.contrib import messages
from django.contrib.auth import login
from django.contrib.auth import views as auth_views
from django.shortcuts import redirect, render
from django.views.decorators.http import require_http_methods

from portal.errors import DomainError
from portal.services.accounts import user_signup
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


login_view = auth_views.LoginView.as_view(redirect_authenticated_user=True)
logout_view = auth_views.LogoutView.as_view()


@require_http_methods(["GET", "POST"])
def signup(request):
    if request.user.is_authenticated:
        return redirect("home")
    form = SignupForm(request.POST or None)
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
            login(request, user, backend="django.contrib.auth.backends.ModelBackend")
            select_organization(request, user.memberships.select_related("organization").get())
            messages.success(request, f"Welcome! You own the organization {org.name}.")
            return redirect("home")
    return render(request, "registration/signup.html", {"form": form}, status=400 if form.errors else 200)
