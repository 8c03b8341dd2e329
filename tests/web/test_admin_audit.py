"""The Django admin writes rows past the services, so it records what it changes of the audited kinds itself:
a quota, a member's role, a member removed, a token revoked (each `via: django-admin`, by the staff user)."""

from __future__ import annotations

import pytest
from django.contrib import admin
from django.forms.models import model_to_dict
from django.test import RequestFactory

from portal.admin import OrganizationAdmin
from portal.models import ApiToken, AuditEntry, Membership, Organization, Quota
from tests.web.pages import signed_in

pytestmark = pytest.mark.django_db


@pytest.fixture
def root(django_user_model):
    return django_user_model.objects.create_superuser("root", "r@example.com", "x" * 12)


def _post_change(client, url: str, obj, **changes):
    data = {k: ("" if v is None else v) for k, v in model_to_dict(obj).items()}
    data.update(changes)
    r = client.post(url, data)
    assert r.status_code == 302, r.content.decode()[:2000]


def test_a_quota_changed_in_the_django_admin_is_audited(root, acme):
    quota = Quota.objects.get(organization=acme)
    before = quota.max_gpus
    url = f"/django-admin/portal/quota/{quota.pk}/change/"
    _post_change(signed_in(root), url, quota, max_gpus=before + 3)
    (entry,) = AuditEntry.objects.filter(action="quota.changed")
    assert entry.organization == acme and entry.actor_user == root and entry.target_label == "acme"
    changes = {"max_gpus": {"from": before, "to": before + 3}}
    assert entry.details == {"changes": changes, "via": "django-admin"}


def test_a_token_revoked_in_the_django_admin_is_audited(root, alice, acme, make_token):
    make_token(alice, acme)
    token = ApiToken.objects.get(user=alice)
    _post_change(
        signed_in(root),
        f"/django-admin/portal/apitoken/{token.pk}/change/",
        token,
        revoked_at_0="2026-12-07",
        revoked_at_1="04:00:00",
    )
    token.refresh_from_db()
    assert token.revoked_at is not None
    (entry,) = AuditEntry.objects.filter(action="token.revoked")
    assert entry.actor_user == root and entry.organization == acme and entry.target_id == str(token.pk)
    assert entry.details == {"via": "django-admin"}


def test_roles_and_removals_through_the_organization_page_are_audited(root, alice, bob, acme):
    """The organization page's membership inline: bob's role changed, then bob removed."""
    ma = OrganizationAdmin(Organization, admin.site)
    request = RequestFactory().post("/")
    request.user = root
    inline = next(i for i in ma.get_inline_instances(request, acme) if i.model is Membership)
    formset_class = inline.get_formset(request, acme)
    prefix = formset_class.get_default_prefix()
    rows = list(Membership.objects.filter(organization=acme).order_by("pk"))

    def post(**per_row):
        data = {f"{prefix}-TOTAL_FORMS": len(rows), f"{prefix}-INITIAL_FORMS": len(rows)}
        for i, m in enumerate(rows):
            data |= {f"{prefix}-{i}-id": m.pk, f"{prefix}-{i}-organization": acme.pk}
            data |= {f"{prefix}-{i}-user": m.user_id, f"{prefix}-{i}-role": m.role}
            data |= {f"{prefix}-{i}-{k}": v for k, v in per_row.get(m.user.username, {}).items()}
        formset = formset_class(data, instance=acme, prefix=prefix)
        assert formset.is_valid(), formset.errors
        ma.save_formset(request, None, formset, change=True)

    post(bob={"role": "admin"})
    (changed,) = AuditEntry.objects.filter(action="member.role_changed")
    assert changed.details == {"from": "member", "to": "admin", "via": "django-admin"}
    assert changed.actor_user == root and changed.target_label == "bob"
    rows = list(Membership.objects.filter(organization=acme).order_by("pk"))
    post(bob={"DELETE": "on"})
    (removed,) = AuditEntry.objects.filter(action="member.removed")
    assert removed.details == {"role": "admin", "via": "django-admin"} and removed.target_label == "bob"
    assert not Membership.objects.filter(organization=acme, user=bob).exists()
    assert AuditEntry.objects.filter(action="member.role_changed").count() == 1  # alice's row: untouched
