import json
import pytest
from tests.conftest import client_for
from portal.models import Quota
from portal.services.orgs import organization_create
pytestmark = pytest.mark.django_db

CASES = [
    ("/api/v1/admin/orgs/acme/quota", "PATCH", '{"fair_share_weight": NaN}'),
    ("/api/v1/admin/orgs/acme/quota", "PATCH", '{"fair_share_weight": "nan"}'),
    ("/api/v1/admin/orgs/acme/quota", "PATCH", '{"fair_share_weight": "inf"}'),
    ("/api/v1/admin/orgs/acme/quota", "PATCH", '{"allowed_pools": ["Bad Pool"]}'),
    ("/api/v1/admin/orgs/acme/quota", "PATCH", '{"allowed_pools": "gpu"}'),
    ("/api/v1/admin/orgs/acme/quota", "PATCH", '{"max_gpus": true}'),
    ("/api/v1/admin/orgs/acme/quota", "PATCH", '{"max_gpus": 1.5}'),
    ("/api/v1/admin/orgs/acme/quota", "PATCH", '[]'),
    ("/api/v1/admin/orgs/acme/quota", "PATCH", '{}'),
    ("/api/v1/admin/orgs/nope/quota", "PATCH", '{"max_gpus": 2}'),
    ("/api/v1/tokens", "POST", '{"name": "a\\u0000b", "scopes": ["jobs:read"]}'),
    ("/api/v1/tokens", "POST", '{"name": "ok", "scopes": ["jobs:read\\u0000"]}'),
    ("/api/v1/tokens", "POST", '{"name": "ok", "scopes": "jobs:read"}'),
    ("/api/v1/tokens", "POST", '{"name": "ok", "scopes": ["root:all"]}'),
    ("/api/v1/tokens", "POST", '{"name": "ok", "scopes": []}'),
    ("/api/v1/tokens", "POST", '{"name": "ok", "scopes": ["jobs:read"], "expires_in_days": 0}'),
    ("/api/v1/tokens", "POST", '{"name": "   ", "scopes": ["jobs:read"]}'),
    ("/api/v1/tokens", "POST", '{"name": 5, "scopes": ["jobs:read"]}'),
    ("/api/v1/tokens", "POST", '{"name": {"a":1}, "scopes": ["jobs:read"]}'),
    ("/api/v1/tokens", "POST", '[1]'),
    ("/api/v1/tokens", "POST", '"x"'),
    ("/api/v1/tokens", "POST", '{"name": "ok", "scopes": ["jobs:read"], "user": "bob"}'),
    ("/api/v1/org/invitations", "POST", '{"email": "x\\u0000@example.com"}'),
    ("/api/v1/org/invitations", "POST", '{"email": "not-an-email"}'),
    ("/api/v1/org/invitations", "POST", '{"email": "a@example.com", "role": "emperor"}'),
    ("/api/v1/org/invitations", "POST", '{"email": "BOB@example.com"}'),
    ("/api/v1/org/invitations", "POST", '{"email": "a@example.com", "org": "globex"}'),
    ("/api/v1/org/invitations", "POST", '{"email": ["a@example.com"]}'),
    ("/api/v1/jobs/00000000-0000-0000-0000-000000000000/cancel", "POST", '{"reason": 5}'),
    ("/api/v1/jobs", "GET", ''),
]

@pytest.mark.parametrize("path,method,body", CASES)
def test_probe(as_alice, make_user, make_token, acme, path, method, body):
    staffer = make_user("staffer", staff=True)
    org = organization_create(slug="ops", name="Ops", owner=staffer)
    c = client_for(make_token(staffer, org, scopes=["platform:admin"])) if "admin" in path else as_alice
    c.raise_request_exception = False
    r = c.generic(method, path, body, content_type="application/json")
    print("\nPROBE", method, path, body, r.status_code, r.content[:300], Quota.objects.get(organization=acme).fair_share_weight)
