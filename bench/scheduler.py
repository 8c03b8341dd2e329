"""Scheduler benchmark: 10,000 queued jobs from 100 organizations on a simulated 1,000-GPU fleet.

    .venv/bin/python bench/scheduler.py [--jobs 10000] [--orgs 100] [--rounds 240] [--seed 1]

Times the scheduler's decision core (``portal.scheduling.policy.plan``, the code ``schedule_pass`` runs
between loading rows and writing admissions) and prints, as tables:

1. one pass over the full queue on an empty fleet: pass time, utilization, each organization's share of the
   fleet against its weight, side by side with the peer's FIFO queue (the head job blocks everything behind
   it), and the best that ANY integer allocation of the same GPUs could do (a weight-1 tenant entitled to
   3.79 GPUs holds 3 or 4: 5.6% off at best);
2. a steady-state simulation (jobs finish, organizations keep their queues full, decayed usage feeds back
   into fair share, jobs waiting over RESERVE_AFTER_S reserve capacity): per-pass time, utilization while
   work is queued, time-averaged shares vs weights, and how long jobs of each size waited.

Shares are measured as Kueue and Slurm do: GPUs held relative to weight among organizations that still have
demand (queued or running work).

No database: this measures the policy and its cost, not PostgreSQL I/O. Needs no Django (nor its settings).
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from portal.scheduling.policy import AllocationView, JobView, OrgView, PoolView, plan

POOLS = [("h100-a", 512), ("h100-b", 256), ("a100", 128), ("l40s", 104)]  # 1,000 GPUs
SIZES = [1] * 50 + [2] * 25 + [4] * 15 + [8] * 10  # % of jobs by GPUs requested
HALF_LIFE_S = 3600.0
ROUND_S = 60.0
RESERVE_AFTER_S = 1800.0


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
    """Held GPUs vs entitlement (total x weight / weights of the organizations with demand; here all)."""
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
    summary(rel)
    return rel


def summary(rel: list[float], label: str = "share/weight") -> str:
    abs_rel = [abs(x) for x in rel]
    p95 = sorted(abs_rel)[int(0.95 * len(abs_rel)) - 1]
    line = (
        f"mean |error| {statistics.mean(abs_rel):.1%}, p95 {p95:.1%}, "
        f"max {max(abs_rel):.1%}; within 5%: {sum(x <= 0.05 + 1e-12 for x in abs_rel)}/{len(abs_rel)}"
    )
    print(f"{label} over all {len(abs_rel)} orgs: {line}")
    return line


def integer_bound(weights: list[float], total: int) -> float:
    """The smallest max |share/weight - 1| any allocation of `total` whole GPUs can reach (bisection on the
    error: each organization's integer interval around its entitlement must be able to sum to `total`)."""
    wsum = sum(weights)
    lo, hi = 0.0, 1.0
    for _ in range(60):
        eps = (lo + hi) / 2
        ent = [total * w / wsum for w in weights]
        mins = [math.ceil(e * (1 - eps) - 1e-9) for e in ent]
        maxs = [math.floor(e * (1 + eps) + 1e-9) for e in ent]
        ok = all(a <= b for a, b in zip(mins, maxs, strict=True)) and sum(mins) <= total <= sum(maxs)
        lo, hi = (lo, eps) if ok else (eps, hi)
    return hi


def fifo_peer(pools, jobs) -> list[tuple[int, int]]:
    """The peer's scheduler: one FIFO queue, the head job waits for room and everything waits behind it."""
    free = {p.name: p.slots for p in pools}
    out = []
    for j in sorted(jobs, key=lambda j: j.created_at):
        pool = next((n for n, f in free.items() if f >= j.gpus), None)
        if pool is None:
            break
        free[pool] -= j.gpus
        out.append((j.org, j.gpus))
    return out


def one_pass(args, rnd) -> None:
    pools, orgs, jobs = make_world(args.orgs, args.jobs, rnd)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        result = plan(pools, orgs, jobs, half_life_s=HALF_LIFE_S)
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    peer = fifo_peer(pools, jobs)
    peer_s = time.perf_counter() - t0
    fleet = sum(p.slots for p in pools)
    used = sum(a.slots for a in result.admit)
    held: dict[int, float] = {}
    job_by = {j.id: j for j in jobs}
    for a in result.admit:
        held[job_by[a.job].org] = held.get(job_by[a.job].org, 0) + a.gpus
    peer_held: dict[int, float] = {}
    for org, gpus in peer:
        peer_held[org] = peer_held.get(org, 0) + gpus
    peer_used = sum(g for _, g in peer)
    print("1. One scheduling pass over the full queue, empty fleet")
    print(f"{'':>38} {'OpenTinker':>12} {'FIFO peer':>12}")
    print(f"{'queued jobs / orgs / fleet GPUs':>38} {f'{len(jobs)} / {len(orgs)} / {fleet}':>25}")
    print(
        f"{'pass time (median of 5)':>38} {statistics.median(times) * 1000:>9.0f} ms {peer_s * 1000:>9.0f} ms"
    )
    print(f"{'jobs admitted':>38} {len(result.admit):>12} {len(peer):>12}")
    print(f"{'utilization':>38} {used / fleet:>12.1%} {peer_used / fleet:>12.1%}")
    ours = shares_table(
        orgs, held, used, "Shares after the pass (held GPUs vs weight; 5 lowest and 5 highest)"
    )
    wsum = sum(o.weight for o in orgs)
    theirs = [
        (peer_held.get(o.id, 0) - peer_used * o.weight / wsum) / (peer_used * o.weight / wsum) for o in orgs
    ]
    summary(theirs, "FIFO peer: share/weight")
    bound = integer_bound([o.weight for o in orgs], used)
    print(
        f"best any whole-GPU allocation of these {used} GPUs can do: max error {bound:.1%} "
        f"(OpenTinker: {max(abs(x) for x in ours):.1%})"
    )


def steady_state(args, rnd) -> None:
    pools, orgs, queue = make_world(args.orgs, args.jobs, rnd)
    fleet = sum(p.slots for p in pools)
    running: list[tuple[AllocationView, float]] = []  # (allocation, finish time)
    decayed = {o.id: 0.0 for o in orgs}
    held_time = {o.id: 0.0 for o in orgs}
    utils, pass_times = [], []
    waits: dict[int, list[float]] = {}  # GPUs -> waits (s) of the jobs admitted after warm-up
    weight_of = {o.id: o.weight for o in orgs}
    small_big = 0  # 8-GPU jobs of weight-1 organizations admitted: the jobs bigger than their share
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
        result = plan(
            views_p,
            views_o,
            queue,
            [a for a, _ in running],
            half_life_s=HALF_LIFE_S,
            now=t,
            reserve_after_s=args.reserve_after,
        )
        pass_times.append(time.perf_counter() - t0)
        admitted = {a.job for a in result.admit}
        job_by = {j.id: j for j in queue}
        for a in result.admit:
            j = job_by[a.job]
            if rnd_no >= warmup:
                waits.setdefault(j.gpus, []).append(t - j.created_at)
                if weight_of[j.org] == 1 and j.gpus == 8:
                    small_big += 1
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
    label = (
        "2a. Steady state, no reservations"
        if args.reserve_after == math.inf
        else f"2b. Steady state, reservation after {args.reserve_after:.0f} s of waiting"
    )
    print(
        f"\n{label}: {args.rounds} passes, one per simulated minute (first {warmup} are "
        f"warm-up); jobs last ~30 min; queues kept at {per_org_queue} jobs per organization"
    )
    print(f"{'passes':>7} {'pass p50':>9} {'pass p95':>9} {'util mean':>10} {'util min':>9}")
    pt = sorted(pass_times)
    print(
        f"{len(pt):>7} {pt[len(pt) // 2] * 1000:>6.0f} ms {pt[int(0.95 * len(pt)) - 1] * 1000:>6.0f} ms "
        f"{statistics.mean(utils):>10.1%} {min(utils):>9.1%}"
    )
    rel = shares_table(
        orgs,
        {k: v / n for k, v in held_time.items()},
        sum(held_time.values()) / n,
        "Time-averaged shares (GPUs held on average vs weight)",
    )
    left = {}
    for j in queue:
        left.setdefault(j.gpus, []).append(t - j.created_at)
    print(f"\nWaits by job size (reservation after {args.reserve_after:.0f} s of waiting)")
    print(
        f"{'GPUs':>5} {'admitted':>9} {'wait p50':>10} {'wait max':>10} {'still queued':>13} {'oldest':>10}"
    )
    for gpus in sorted(set(waits) | set(left)):
        w, q = sorted(waits.get(gpus, [0.0])), left.get(gpus, [0.0])
        print(
            f"{gpus:>5} {len(waits.get(gpus, [])):>9} {w[len(w) // 2] / 60:>7.0f} min {w[-1] / 60:>7.0f} min "
            f"{len(left.get(gpus, [])):>13} {max(q) / 60:>6.0f} min"
        )
    print(f"8-GPU jobs of weight-1 organizations (bigger than their 3.8-GPU share) admitted: {small_big}")
    return rel, small_big, waits.get(8, [])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--orgs", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=240)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--reserve-after", type=float, default=RESERVE_AFTER_S, help="seconds (inf: no reservations)"
    )
    args = parser.parse_args()
    one_pass(args, random.Random(args.seed))  # noqa: S311 -- a reproducible simulation
    runs = {}
    for reserve in (math.inf, args.reserve_after):
        rnd = random.Random(args.seed)  # noqa: S311 -- a reproducible simulation
        runs[reserve] = steady_state(argparse.Namespace(**{**vars(args), "reserve_after": reserve}), rnd)
    print("\n3. Steady state side by side: fair share vs big jobs")
    print(f"{'':>52} {'no reservations':>16} {f'reserve after {args.reserve_after:.0f} s':>22}")
    (r0, b0, w0), (r1, b1, w1) = runs[math.inf], runs[args.reserve_after]
    for name, f in (
        (
            "orgs within 5% of their weight (time-averaged)",
            lambda r, b, w: f"{sum(abs(x) <= 0.05 for x in r)}/{len(r)}",
        ),
        ("max share error", lambda r, b, w: f"{max(abs(x) for x in r):.1%}"),
        ("8-GPU jobs of weight-1 orgs admitted", lambda r, b, w: str(b)),
        (
            "8-GPU jobs admitted, wait p50",
            lambda r, b, w: f"{sorted(w)[len(w) // 2] / 60:.0f} min" if w else "-",
        ),
    ):
        print(f"{name:>52} {f(r0, b0, w0):>16} {f(r1, b1, w1):>22}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
