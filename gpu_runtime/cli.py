"""`python -m gpu_runtime run spec.yaml|spec.json [--sink jsonl|http] [--resume URI] [--env-package DIR]`.

`python -m gpu_runtime merge-lora SRC -o DST [--base MODEL]`: a downloaded LoRA checkpoint merged into a full
Hugging Face model directory (gpu_runtime/merge.py).

`--env-package DIR_OR_ARCHIVE` runs a local environment package (a directory with its opentinker.json, or a
.tar.gz) in the sandbox, as a job runs a published one: authors try a package before `opentinker envs push`.

The HTTP sink reads `OPENTINKER_INGEST_URL` and `OPENTINKER_JOB_TOKEN` (set by the platform's launcher, so
the token never appears in a process listing); it is the default when they are set. On a Ray pool the
launcher gives `OPENTINKER_BOOTSTRAP_TOKEN` instead, redeemed first for the job token and the environment
secret (gpu_runtime/bootstrap.py). Checkpoints go to
`--checkpoint-prefix`, else `OPENTINKER_CHECKPOINT_PREFIX` / `OPENTINKER_CHECKPOINT_URI`, else
`file://./var/checkpoints/<job name>-<time>`; a re-queued job resumes from `OPENTINKER_RESUME_FROM`.
Several trainer ranks (`resources.trainer_ranks`, or `--world-size N`) are Ray actors with `--ray` or inside a
Ray cluster (`RAY_ADDRESS`, a `ray` pool's job), else processes of this machine that this one, rank 0, starts
(`python -m gpu_runtime rank ...`, gpu_runtime/ranks.py).
Exit codes: 0 succeeded, 1 failed, 2 usage, 3 cancelled, 4 max_hours reached.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from gpu_runtime.sink import Sink
from opentinker.spec import JobSpec


def load_spec(path: str) -> JobSpec:
    text = Path(path).read_text()
    if path.endswith((".yaml", ".yml")):
        import yaml

        return JobSpec.model_validate(yaml.safe_load(text))
    return JobSpec.model_validate(json.loads(text))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gpu_runtime")
    sub = p.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run one job")
    run.add_argument("spec")
    # Launched by the platform (OPENTINKER_INGEST_URL set), report to its ingest API; standalone, print JSONL.
    run.add_argument(
        "--sink",
        choices=["jsonl", "http"],
        default="http" if os.environ.get("OPENTINKER_INGEST_URL") else "jsonl",
    )
    run.add_argument("--resume", default=None, help="checkpoint URI (a step directory or a prefix)")
    run.add_argument("--checkpoint-prefix", default=None)
    run.add_argument("--ray", action="store_true", help="run workers as Ray actors (RAY_ADDRESS or local)")
    run.add_argument(
        "--world-size",
        type=int,
        default=None,
        help="trainer ranks (FSDP2; default the spec's resources.trainer_ranks): Ray actors with --ray or "
        "in a Ray cluster (RAY_ADDRESS), else processes of this machine",
    )
    run.add_argument(
        "--env-package",
        default=None,
        help="a local environment package (directory or .tar.gz) to run sandboxed instead of the spec's",
    )
    merge = sub.add_parser("merge-lora", help="merge a downloaded LoRA checkpoint into a full HF model")
    merge.add_argument("src", help="a checkpoint step directory (opentinker jobs download ID)")
    merge.add_argument("-o", "--output", required=True, help="the merged model's directory (must not exist)")
    merge.add_argument("--base", default=None, help="the base model (default: the one in meta.json's spec)")
    # Started by rank 0 of a job whose ranks are local processes (gpu_runtime/ranks.py); the spec on stdin.
    rank = sub.add_parser("rank", help=argparse.SUPPRESS)
    rank.add_argument("rank", type=int)
    rank.add_argument("world_size", type=int)
    rank.add_argument("master")
    rank.add_argument("parent", type=int)
    args = p.parse_args(argv)
    if args.cmd == "merge-lora":
        return merge_lora(args)
    if args.cmd == "rank":
        if not die_with_parent(args.parent):
            return 1
        from gpu_runtime.ranks import follow  # torch: after the line above, not before

        try:
            code = follow(args.rank, args.world_size, args.master)
        except BaseException:  # its own error: exit 1 (the job fails), not a teardown signal (re-queued)
            traceback.print_exc()
            code = 1
        # Leave without the interpreter's teardown of torch's native state, which aborted a rank once in ~30
        # runs (SIGABRT, commit 27e2625): after the job it would be said in the job's log as a rank that
        # ended badly; after an error, rank 0 would take the signal for a lost rank and re-queue the job.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    from gpu_runtime.bootstrap import BootstrapError, redeem

    try:
        # A Ray job gets a single-use bootstrap token, not its secrets: trade it before anything else.
        redeem()
    except BootstrapError as e:
        print(f"opentinker: {e}", file=sys.stderr, flush=True)
        return 1
    raw = json.loads(Path(args.spec).read_text()) if args.spec.endswith(".json") else None
    if isinstance(raw, dict) and raw.get("kind") == "tinker":
        # A model server the platform started as a job (portal/services/model_servers.py), not a JobSpec.
        from gpu_runtime.model_server.serve import serve_spec

        return serve_spec(raw)
    spec = load_spec(args.spec)
    if args.env_package:
        os.environ["OPENTINKER_ENV_PACKAGE"] = str(Path(args.env_package).resolve())
    sink: Sink
    if args.sink == "http":
        from gpu_runtime.sink import HttpSink

        sink = HttpSink(os.environ["OPENTINKER_INGEST_URL"], os.environ["OPENTINKER_JOB_TOKEN"])
    else:
        from gpu_runtime.sink import JsonlSink

        sink = JsonlSink()
    run_name = f"{spec.display_name.replace(' ', '_')}-{int(time.time())}"
    prefix = (
        args.checkpoint_prefix
        or os.environ.get("OPENTINKER_CHECKPOINT_PREFIX")
        or os.environ.get("OPENTINKER_CHECKPOINT_URI")  # set by the platform's launcher
        or f"file://{Path('var/checkpoints').resolve()}/{run_name}"
    )
    resume = args.resume or os.environ.get("OPENTINKER_RESUME_FROM") or spec.resume_from
    world_size = args.world_size or spec.resources.trainer_ranks
    # Several rollout workers are Ray actors; so are several trainer ranks inside a Ray cluster (a `ray`
    # pool's job: RAY_ADDRESS), where they may sit on several nodes. Elsewhere the ranks are processes of
    # this machine (run_job).
    use_ray = (
        args.ray
        or spec.resources.rollout_workers > 1
        or (world_size > 1 and bool(os.environ.get("RAY_ADDRESS")))
    )
    return run_job(spec, sink, prefix, resume=resume, use_ray=use_ray, world_size=world_size)


def die_with_parent(parent: int) -> bool:
    """A follower rank dies with rank 0 (SIGKILL when its parent ends, Linux), set before its slow imports;
    False when rank 0 is gone already."""
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    return os.getppid() == parent


def merge_lora(args: argparse.Namespace) -> int:
    from gpu_runtime.merge import MergeError, merge_checkpoint

    try:
        written = merge_checkpoint(Path(args.src), Path(args.output), base=args.base)
    except (MergeError, OSError) as e:
        print(f"merge-lora: {e}", file=sys.stderr, flush=True)
        return 1
    for path in written:
        print(f"merged model written to {path}", flush=True)
    return 0


def run_job(spec, sink, prefix, *, resume=None, use_ray=False, world_size=1) -> int:
    from gpu_runtime.controller import EXIT_FAILED, Controller, JobLoop
    from gpu_runtime.groups import LocalGroup, RankLost, RayGroup, WorkerGroup
    from gpu_runtime.multiagent import MultiAgentController, MultiAgentGroup, is_multi_agent

    started = time.monotonic()
    lost = False
    group: WorkerGroup | MultiAgentGroup | None = None
    controller: JobLoop
    try:
        multi_agent = is_multi_agent(spec)
        # Several ranks without Ray: processes of this machine (gpu_runtime/ranks.py), rank 0 this one. A
        # multi-agent job has ranks per policy: those are Ray actors (a local Ray without RAY_ADDRESS).
        spawn = world_size > 1 and not use_ray and not multi_agent
        use_ray = use_ray or (world_size > 1 and not spawn)
        if world_size > 1:  # in the job's log: how this job trains
            how = "Ray actors" if use_ray else "processes of this machine"
            print(f"trainer ranks: {world_size}, {how}", file=sys.stderr, flush=True)
        if use_ray:
            import ray

            if not ray.is_initialized():
                address = os.environ.get("RAY_ADDRESS")
                # A local Ray (no RAY_ADDRESS) serves this machine only: on loopback. Ray turns 127.0.0.1
                # into the machine's network address, any other 127/8 address it keeps.
                local = {"num_cpus": 2, "_node_ip_address": "127.0.0.2"}
                ray.init(address=address, **({} if address else local), log_to_driver=False)
        if multi_agent:  # games through the coordinator, one parameter set per trained policy
            group = games = MultiAgentGroup(spec, use_ray=use_ray, world_size=world_size)
            controller = MultiAgentController(spec, sink, games, prefix)
        else:
            ranks: WorkerGroup
            if use_ray:
                group = ranks = RayGroup(spec, world_size)
                if world_size > 1:  # in the job's log: where the ranks run and where they met
                    where = "; ".join(
                        f"rank {r} on {p['address']} (node {p['node_id'][:12]}, pid {p['pid']})"
                        for r, p in enumerate(ranks.placed)
                    )
                    print(f"trainer ranks met at {ranks.master}: {where}", file=sys.stderr, flush=True)
            elif spawn:
                from gpu_runtime.ranks import SpawnedGroup

                group = ranks = SpawnedGroup(spec, world_size)
            else:
                group = ranks = LocalGroup(spec)
            controller = Controller(spec, sink, ranks, prefix)
        result = controller.run(resume=resume, start_time=started)
        return result.exit_code
    except RankLost as e:
        # Lost like a killed runtime (no outcome reported): once the others are stopped, this process ends
        # by SIGKILL, which the platform re-queues, as rank 0 of spawned ranks does (gpu_runtime/ranks.py).
        lost = True
        sink.log(traceback.format_exc())
        print(f"job failed: {e}", file=sys.stderr, flush=True)  # last on stderr: the runner keeps it
        return EXIT_FAILED
    except Exception as e:
        sink.log(traceback.format_exc())
        sink.event("failed", error=f"{type(e).__name__}: {e}")
        # Last on stderr: the platform's runner keeps the stderr tail as the failed job's reason.
        print(f"job failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    finally:
        try:
            try:
                if group is not None:
                    group.shutdown()
            finally:  # a shutdown that raises must not cost the platform the job's final event
                sink.close()
        finally:
            if lost:
                os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())
