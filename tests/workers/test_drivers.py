"""The drivers' typed interface: a pool's kind picks its driver, capacity is a PoolCapacity the domain stores.

The drivers' real work (a runner's process, a Ray cluster) is in test_local_driver.py, test_ray_driver.py and
test_ray_logs.py; here, what the supervisor relies on without branching on the pool's kind.
"""

from __future__ import annotations

import dataclasses

import pytest

from portal.models import ComputePool
from portal.services.pools import PoolCapacity, pool_report
from tests.workers.conftest import make_pool
from workers.drivers import Driver, driver_for
from workers.drivers.local import LocalDriver
from workers.drivers.ray import RayDriver

pytestmark = pytest.mark.django_db


def test_gpus_are_counted_by_type_and_without_any_the_cpus_are_slots():
    gpus = PoolCapacity.measured({"H100": 6, "A100": 2}, cpus=64, memory_bytes=2**40)
    assert (gpus.gpus_by_type, gpus.total_gpus, gpus.cpu_slots) == ({"H100": 6, "A100": 2}, 8, False)
    cpu = PoolCapacity.measured({}, cpus=4, memory_bytes=2**30)
    assert (cpu.gpus_by_type, cpu.total_gpus, cpu.cpu_slots) == ({"cpu-slot": 4}, 4, True)
    assert PoolCapacity.measured({}, cpus=4, memory_bytes=0, slots=2).gpus_by_type == {"cpu-slot": 2}
    with pytest.raises(dataclasses.FrozenInstanceError):
        cpu.cpus = 8  # type: ignore[misc]


def test_a_capacity_report_is_what_the_pool_row_then_says():
    pool = make_pool("gpu-x", 1)
    pool_report(
        pool=pool,
        capacity=PoolCapacity.measured({"L4": 3}, cpus=16, memory_bytes=123),
        health=ComputePool.Health.HEALTHY,
    )
    pool = ComputePool.objects.get(pk=pool.pk)
    assert (pool.gpus_by_type, pool.total_gpus, pool.cpus, pool.memory_bytes, pool.cpu_slots) == (
        {"L4": 3},
        3,
        16,
        123,
        False,
    )
    pool_report(pool=pool, capacity=None, health=ComputePool.Health.DOWN, message="gone")
    pool = ComputePool.objects.get(pk=pool.pk)
    assert (pool.health, pool.total_gpus) == ("down", 3)  # no reading: the last capacity stands


def test_the_pools_kind_picks_its_driver_and_each_says_who_stops_reporting():
    local = driver_for(make_pool("here", 1))
    ray = driver_for(make_pool("there", 1, driver="ray", ray_address="http://ray.invalid:8265"))
    assert isinstance(local, LocalDriver) and isinstance(ray, RayDriver)
    assert all(isinstance(d, Driver) for d in (local, ray))
    assert (local.lost_detail, ray.lost_detail) == ("runner heartbeat lost", "ray cluster not answering")


def test_a_local_runtime_is_followed_by_its_own_runner_not_by_the_supervisor():
    pool = make_pool("here", 1)
    # Nothing to look at, and nothing touched: the allocation argument is not even read.
    assert driver_for(pool).follow(None) is False  # type: ignore[arg-type]
