"""Scheduler benchmark: 10,000 queued jobs from 100 organizations on a simulated 1,000-GPU fleet.

    .venv/bin/python bench/scheduler.py [--jobs 10000] [--orgs 100] [--rounds 240] [--seed 1]

Times the scheduler's decision core (``portal.services.scheduler.plan``, the code ``schedule_pass`` runs
between loading rows and writing admissions) and prints, as tables:

1. one pass over the full queue on an empty fleet: pass time, utilization, each organization's share of the
   fleet against its weight;
2. a steady-state simulation (jobs finish, organizations keep their queues full, decayed usage feeds back
   into fair share): per-pass time, utilization while work is queued, and time-averaged shares vs weights.

No database: this measures the policy and its cost, not PostgreSQL I/O. Needs no Django settings.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from portal.services.scheduler import AllocationView, JobView, OrgView, PoolView, plan

POOLS = [("h100-a", 512), ("h100-b", 256), ("a100", 128), ("l40s", 104)]  # 1,000 GPUs
SIZES = [1] * 50 + [2] * 25 + [4] * 15 + [8] * 10  # % of jobs by GPUs requested
HALF_LIFE_S = 3600.0
ROUND_S = 60.0


def make_world(n_orgs: int, n_jobs: int, rnd: random.Random):
    pools = [PoolView(name=n, slots=s) for n, s in POOLS]
    orgs = [
        OrgView(id=i, nominal_gpus=200, borrowing_limit_gpus=200, weight=float(rnd.choice([1, 2, 3, 4])))
        for i in range(n_orgs)
    ]
    jobs = [new_job(rnd, rnd.randrange(n_orgs), float(k)) for k in range(n_jobs)]
    return pools, orgs, jobs


_ids = iter(range(10**12))


def new_job(rnd: random.Random, org: int, t: float) -> JobView:
    return JobView(
        id=next(_ids), org=org, gpus=rnd.choice(SIZES), priority=rnd.choice([-1, 0, 0, 1]), created_at=t
    )


def shares_table(orgs, held: dict[int, float], total: float, title: str) -> list[float]:
    weight_sum = sum(o.weight for o in orgs)
    rows, rel = [], []
    for o in orgs:
        entitled = total * o.weight / weight_sum
        got = held.get(o.id, 0.0)
        rel.append((got - entitled) / entitled)
        rows.append((o.id, o.weight, entitled, got))
    print(f"\n{title}")
    print(f"{'org':>5} {'weight':>6} {'entitled GPUs':>14} {'held GPUs':>10} {'share/weight':>13}")
    rows.sort(key=lambda r: r[3] / r[2])
    for r in [*rows[:5], None, *rows[-5:]]:
        if r is None:
            print(f"{'...':>5}")
            continue
        print(f"{r[0]:>5} {r[1]:>6.0f} {r[2]:>14.2f} {r[3]:>10.2f} {r[3] / r[2]:>13.3f}")
    abs_rel = [abs(x) for x in rel]
    print(
        f"share/weight over all {len(orgs)} orgs: mean |error| {statistics.mean(abs_rel):.1%}, "
        f"p95 {sorted(abs_rel)[int(0.95 * len(abs_rel)) - 1]:.1%}, max {max(abs_rel):.1%}; "
        f"within 5%: {sum(x <= 0.05 for x in abs_rel)}/{len(orgs)}"
    )
    return abs_rel


def one_pass(args, rnd) -> None:
    pools, orgs, jobs = make_world(args.orgs, args.jobs, rnd)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        result = plan(pools, orgs, jobs, half_life_s=HALF_LIFE_S)
        times.append(time.perf_counter() - t0)
    fleet = sum(p.slots for p in pools)
    used = sum(a.slots for a in result.admit)
    held: dict[int, float] = {}
    job_by = {j.id: j for j in jobs}
    for a in result.admit:
        held[job_by[a.job].org] = held.get(job_by[a.job].org, 0) + a.gpus
    print("1. One scheduling pass over the full queue, empty fleet")
    print(
        f"{'queued jobs':>12} {'orgs':>5} {'fleet GPUs':>10} {'pass (median of 5)':>19} {'admitted':>9} "
        f"{'utilization':>12}"
    )
    print(
        f"{len(jobs):>12} {len(orgs):>5} {fleet:>10} {statistics.median(times) * 1000:>16.0f} ms "
        f"{len(result.admit):>9} {used / fleet:>12.1%}"
    )
    shares_table(orgs, held, used, "Shares after the pass (held GPUs vs weight; 5 lowest and 5 highest)")


def steady_state(args, rnd) -> None:
    pools, orgs, queue = make_world(args.orgs, args.jobs, rnd)
    fleet = sum(p.slots for p in pools)
    running: list[tuple[AllocationView, float]] = []  # (allocation, finish time)
    decayed = {o.id: 0.0 for o in orgs}
    held_time = {o.id: 0.0 for o in orgs}
    utils, pass_times = [], []
    per_org_queue = args.jobs // args.orgs
    warmup = args.rounds // 4
    t = 0.0
    for rnd_no in range(args.rounds):
        t += ROUND_S
        done = [a for a, end in running if end <= t]
        running = [(a, end) for a, end in running if end > t]
        used_pool = {p.name: 0 for p in pools}
        used_org = {o.id: 0 for o in orgs}
        for a, _ in running:
            used_pool[a.pool] += a.slots
            used_org[a.org] += a.gpus
        del done
        # Organizations keep their queues full.
        counts = {o.id: 0 for o in orgs}
        for j in queue:
            counts[j.org] += 1
        for o in orgs:
            queue += [new_job(rnd, o.id, t) for _ in range(per_org_queue - counts[o.id])]
        views_p = [PoolView(p.name, p.slots, used_pool[p.name]) for p in pools]
        views_o = [
            OrgView(
                **{
                    **o.__dict__,
                    "used_gpus": used_org[o.id],
                    "used_slots": used_org[o.id],
                    "decayed_slot_seconds": decayed[o.id],
                }
            )
            for o in orgs
        ]
        t0 = time.perf_counter()
        result = plan(views_p, views_o, queue, [a for a, _ in running], half_life_s=HALF_LIFE_S)
        pass_times.append(time.perf_counter() - t0)
        admitted = {a.job for a in result.admit}
        job_by = {j.id: j for j in queue}
        for a in result.admit:
            j = job_by[a.job]
            duration = rnd.expovariate(1 / 1800) + ROUND_S  # mean ~30 min
            running.append(
                (AllocationView(j.id, j.id, j.org, a.pool, a.gpus, a.slots, a.borrowed), t + duration)
            )
        queue = [j for j in queue if j.id not in admitted]
        # Account this round: usage history decays with its half-life.
        factor = 0.5 ** (ROUND_S / HALF_LIFE_S)
        held = {o.id: 0 for o in orgs}
        for a, _ in running:
            held[a.org] += a.gpus
        for o in orgs:
            decayed[o.id] = decayed[o.id] * factor + held[o.id] * ROUND_S
            if rnd_no >= warmup:
                held_time[o.id] += held[o.id]
        if rnd_no >= warmup:
            utils.append(sum(held.values()) / fleet)
    n = args.rounds - warmup
    print(
        f"\n2. Steady state: {args.rounds} passes, one per simulated minute (first {warmup} are warm-up); "
        f"jobs last ~30 min; queues kept at {per_org_queue} jobs per organization"
    )
    print(f"{'passes':>7} {'pass p50':>9} {'pass p95':>9} {'util mean':>10} {'util min':>9}")
    pt = sorted(pass_times)
    print(
        f"{len(pt):>7} {pt[len(pt) // 2] * 1000:>6.0f} ms {pt[int(0.95 * len(pt)) - 1] * 1000:>6.0f} ms "
        f"{statistics.mean(utils):>10.1%} {min(utils):>9.1%}"
    )
    shares_table(
        orgs,
        {k: v / n for k, v in held_time.items()},
        sum(held_time.values()) / n,
        "Time-averaged shares (GPUs held on average vs weight)",
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--orgs", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=240)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    one_pass(args, random.Random(args.seed))  # noqa: S311 -- a reproducible simulation
    steady_state(args, random.Random(args.seed))  # noqa: S311
    return 0


if __name__ == "__main__":
    sys.exit(main())
