from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.shortcuts import render

from portal.selectors.orgs import membership_list_for_user


@login_required
def home(request):
    memberships = membership_list_for_user(request.user)
    return render(request, "portal/home.html", {"memberships": memberships, "mode": settings.MODE})
