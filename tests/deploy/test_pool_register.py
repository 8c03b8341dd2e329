"""`manage.py pool_register`: how deployments register their Ray clusters (KubeRay RayClusters of the Helm
chart, the compose file's Ray head) as pools of the ray driver; run again on every upgrade."""

from __future__ import annotations

import pytest
from django.core.management import CommandError, call_command

from portal.models import AuditEntry, ComputePool

pytestmark = pytest.mark.django_db


def test_registers_then_updates_a_ray_pool(capsys):
    call_command(
        "pool_register", "gpu-h100", "--ray-address", "http://ray-head:8265", "--labels", '{"gpu": "H100"}'
    )
    pool = ComputePool.objects.get(name="gpu-h100")
    assert (pool.driver, pool.ray_address, pool.labels, pool.enabled) == (
        "ray",
        "http://ray-head:8265",
        {"gpu": "H100"},
        True,
    )
    call_command("pool_register", "gpu-h100", "--ray-address", "http://other:8265", "--disabled")
    pool.refresh_from_db()
    assert (pool.ray_address, pool.labels, pool.enabled) == ("http://other:8265", {}, False)
    assert ComputePool.objects.filter(name="gpu-h100").count() == 1
    assert "pool gpu-h100 updated: ray at http://other:8265" in capsys.readouterr().out
    assert AuditEntry.objects.filter(target_label="gpu-h100").count() == 2  # created, updated


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["Bad_Name", "--ray-address", "http://h:8265"], "name"),
        (["gpu", "--ray-address", ""], "ray_address"),
        (["gpu", "--ray-address", "http://h:8265", "--labels", "[1]"], "expected a JSON object of strings"),
        (["gpu", "--ray-address", "http://h:8265", "--labels", "{"], "not JSON"),
        (["local", "--ray-address", "http://h:8265"], "exists with the local driver"),
    ],
)
def test_bad_input_is_refused_and_nothing_written(args, message):
    ComputePool.objects.create(name="local", driver="local")
    with pytest.raises(CommandError, match=message):
        call_command("pool_register", *args)
    assert list(ComputePool.objects.values_list("name", "driver")) == [("local", "local")]
