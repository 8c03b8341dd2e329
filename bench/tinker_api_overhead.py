"""The Tinker-compatible API's own cost per call: the official `tinker` SDK through the platform (protobuf,
PostgreSQL future, Valkey queue, model server process, ingest, long-polled retrieve_future) vs the same
forward_backward + optim_step on `ModelServer` in-process.

    .venv/bin/python bench/tinker_api_overhead.py [--rounds 20] [--datums 4] [--tokens 64] [--rank 16]

Starts its own embedded PostgreSQL + Valkey in a temporary directory, migrates, serves portal.asgi with
uvicorn and starts `python -m gpu_runtime.model_server serve` for tiny-qwen2 (CPU). A round: one
forward_backward (`--datums` sequences of `--tokens` tokens, cross_entropy) and one optim_step, sent
together and both awaited. Median of `--rounds` rounds after two warm-up rounds; overhead = SDK round minus
in-process round.
"""

from __future__ import annotations

import argparse
import os
import random
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.ingest import _free_port, _wait_up  # the same embedded-platform plumbing

ROOT = Path(__file__).resolve().parent.parent
BASE = "tiny-qwen2"


def _key() -> str:
    from django.contrib.auth import get_user_model

    from portal.models import Membership
    from portal.services.orgs import organization_create
    from portal.services.tokens import token_create

    user = get_user_model().objects.create_user("bench", "bench@example.com", "bench-password-123")
    org = organization_create(slug="bench", name="Bench", owner=user)
    membership = Membership.objects.get(organization=org, user=user)
    _, secret = token_create(membership=membership, name="bench", scopes=["tinker"])
    return f"tml-{secret}"


def _sequences(args) -> list[list[int]]:
    rng = random.Random(0)  # noqa: S311 (benchmark data, not a secret)
    return [[rng.randrange(3, 200) for _ in range(args.tokens + 1)] for _ in range(args.datums)]


def _sdk_rounds(base_url: str, key: str, args) -> list[float]:
    import tinker
    from tinker import types

    service = tinker.ServiceClient(base_url=f"{base_url}/tinker", api_key=key)
    trainer = service.create_lora_training_client(base_model=BASE, rank=args.rank, seed=0).result(timeout=300)
    data = [
        types.Datum(
            model_input=types.ModelInput.from_ints(s[:-1]),
            loss_fn_inputs={"target_tokens": s[1:], "weights": [1.0] * (len(s) - 1)},
        )
        for s in _sequences(args)
    ]
    times = []
    for _ in range(args.rounds + 2):
        start = time.perf_counter()
        fb = trainer.forward_backward(data, "cross_entropy")
        opt = trainer.optim_step(types.AdamParams(learning_rate=1e-4))
        fb.result(timeout=300)
        opt.result(timeout=300)
        times.append(time.perf_counter() - start)
    service.close("success").result(timeout=60)
    return times[2:]


def _in_process_rounds(args) -> list[float]:
    import torch

    from gpu_runtime.model_server import (
        AdamParams,
        Datum,
        ForwardBackward,
        LoraConfig,
        ModelServer,
        OptimStep,
    )

    torch.set_num_threads(args.threads)
    server = ModelServer(BASE)
    server.create_model("m", LoraConfig(rank=args.rank, seed=0))
    seqs = _sequences(args)
    data = [Datum(s[:-1], {"target_tokens": s[1:], "weights": [1.0] * (len(s) - 1)}) for s in seqs]
    times, seq = [], 1
    for _ in range(args.rounds + 2):
        start = time.perf_counter()
        server.call("m", seq, ForwardBackward(data, "cross_entropy"))
        server.call("m", seq + 1, OptimStep(AdamParams(learning_rate=1e-4)))
        times.append(time.perf_counter() - start)
        seq += 2
    return times[2:]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--datums", type=int, default=4)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch threads, in-process and in the model server")
    args = p.parse_args()

    from devstack.embedded import EmbeddedServices

    root = Path(tempfile.mkdtemp(prefix="otk-bench-"))
    root.chmod(0o755)
    services = EmbeddedServices(root / "services", fast=True)
    procs: list[subprocess.Popen] = []
    try:
        urls = services.start()
        env = {
            **os.environ,
            **urls.as_env(),
            "OPENTINKER_VAR_DIR": str(root / "var"),
            "SECRET_KEY": secrets.token_urlsafe(50),
            "TOKEN_PEPPER": secrets.token_urlsafe(32),
            "LOG_LEVEL": "WARNING",
            "TINKER_TELEMETRY": "0",
        }
        os.environ.update(env)
        subprocess.run([sys.executable, "manage.py", "migrate", "-v", "0"], cwd=ROOT, env=env, check=True)
        import django

        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
        django.setup()
        from django.conf import settings

        from api.tinker.server_tokens import model_server_token_issue

        key = _key()
        port = _free_port()
        base_url = f"http://127.0.0.1:{port}"
        procs.append(
            subprocess.Popen(
                [
                    *(sys.executable, "-m", "uvicorn", "portal.asgi:application", "--host", "127.0.0.1"),
                    *("--port", str(port), "--lifespan", "off", "--log-level", "warning", "--no-access-log"),
                ],
                cwd=ROOT,
                env=env,
            )
        )
        server_env = {
            **env,
            "OPENTINKER_MODEL_SERVER_TOKEN": model_server_token_issue(BASE),
            "OMP_NUM_THREADS": str(args.threads),
        }
        procs.append(
            subprocess.Popen(
                [
                    *(sys.executable, "-m", "gpu_runtime.model_server", "serve", "--base-model", BASE),
                    *("--queue-url", settings.REDIS_URL),
                    *("--ingest-url", f"{base_url}/tinker/ingest/outcomes"),
                ],
                cwd=ROOT,
                env=server_env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        _wait_up(base_url)
        sdk = statistics.median(_sdk_rounds(base_url, key, args))
        local = statistics.median(_in_process_rounds(args))
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
        services.stop()
        shutil.rmtree(root, ignore_errors=True)

    rows = [
        ("in-process ModelServer", f"{local * 1000:.1f}", "-"),
        ("tinker SDK -> API -> queue -> model server", f"{sdk * 1000:.1f}", f"{(sdk - local) * 1000:+.1f}"),
    ]
    headers = ("path", "ms per round (fb + optim)", "overhead ms per round")
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    print()
    print(
        f"bench/tinker_api_overhead.py  ({os.cpu_count()} CPUs; {BASE}, {args.datums} x {args.tokens} "
        f"tokens, rank {args.rank}, median of {args.rounds} rounds)"
    )
    for r in [headers, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
