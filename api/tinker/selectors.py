"""Reads of the Tinker API's objects for people: an organization's sessions, training clients and saved
weights (the portal page, `/api/v1/tinker/...` and `opentinker tinker ...`), and the model servers' queues
for the admin console.

Every lookup takes the caller's organization: another organization's id is a 404, never a 403. A training
client's steps are its completed `optim_step` calls (the futures are the truth about what ran).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import PurePosixPath
from typing import Any

import redis
from django.conf import settings
from django.db.models import Count, Max, Q, QuerySet

from api.tinker import queue
from api.tinker.models import TinkerFuture, TinkerModel, TinkerSession, TinkerWeights
from api.tinker.services import uuid_or_none  # the same id parsing as the SDK's routes
from opentinker import storage as objects
from portal import storage
from portal.errors import NotFound
from portal.models import MODEL_SERVER_KIND, Job, Organization
from portal.models.jobs import LIVE_STATES
from portal.services.model_servers import ServerAllocation, model_server_allocations

# What a saved weights directory holds (gpu_runtime/model_server/adapter_io.py): the PEFT adapter is
# adapter_config.json + adapter_model.safetensors; a saved state adds the Adam moments.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
OPTIMIZER_FILE = "optimizer.safetensors"
META_FILE = "meta.json"
# Files of a weights directory that may be downloaded (anything else there is not served).
SERVED_FILES = (*ADAPTER_FILES, META_FILE, OPTIMIZER_FILE)

_DONE = TinkerFuture.State.DONE
_PENDING = TinkerFuture.State.PENDING


def session_list(org: Organization) -> QuerySet[TinkerSession]:
    return (
        TinkerSession.objects.filter(organization=org)
        .select_related("created_by")
        .annotate(
            training_clients=Count("models", filter=Q(models__kind=TinkerModel.Kind.TRAIN), distinct=True),
            samplers=Count("models", filter=Q(models__kind=TinkerModel.Kind.SAMPLE), distinct=True),
        )
        .order_by("-created_at", "pk")  # a total order: pages neither repeat nor skip a session
    )


def session_detail(org: Organization, session_id: str) -> TinkerSession:
    session = session_list(org).filter(pk=uuid_or_none(session_id)).first()
    if session is None:
        raise NotFound("no such session")
    return session


def model_list(org: Organization, *, session_id: str | None = None) -> QuerySet[TinkerModel]:
    """Training clients with their steps (completed optim_step calls), forward_backward calls, pending calls
    and number of saved weights, newest first."""
    models = TinkerModel.objects.filter(organization=org, kind=TinkerModel.Kind.TRAIN)
    if session_id is not None:
        models = models.filter(session=session_detail(org, session_id))
    return (
        models.select_related("session")
        .annotate(
            steps=Count(
                "futures", filter=Q(futures__operation="optim_step", futures__state=_DONE), distinct=True
            ),
            forward_backward_calls=Count(
                "futures",
                filter=Q(futures__operation="forward_backward", futures__state=_DONE),
                distinct=True,
            ),
            pending_calls=Count("futures", filter=Q(futures__state=_PENDING), distinct=True),
            saved_weights=Count("weights", distinct=True),
            last_call_at=Max("futures__completed_at"),
        )
        .order_by("-created_at", "pk")
    )


def model_detail(org: Organization, model_id: str) -> TinkerModel:
    model = model_list(org).filter(pk=str(model_id)[:80]).first()
    if model is None:
        raise NotFound("no such model")
    return model


def weights_list(
    org: Organization, *, model_id: str | None = None, session_id: str | None = None
) -> QuerySet[TinkerWeights]:
    weights = TinkerWeights.objects.filter(organization=org).select_related("model")
    if model_id is not None:
        weights = weights.filter(model=model_detail(org, model_id))
    if session_id is not None:
        weights = weights.filter(model__session=session_detail(org, session_id))
    return weights.order_by("-created_at", "-pk")


def weights_detail(org: Organization, weights_id: int | str) -> TinkerWeights:
    try:
        pk = int(weights_id)
    except (TypeError, ValueError):
        raise NotFound("no such weights") from None
    weights = TinkerWeights.objects.filter(organization=org, pk=pk).select_related("model").first()
    if weights is None:
        raise NotFound("no such weights")
    return weights


def weights_path(weights: TinkerWeights) -> str:
    """The `tinker://` path the SDK knows it by (load_state, create_sampling_client)."""
    return f"tinker://{weights.model_id}/{weights.kind}/{weights.name}"


@dataclass(frozen=True)
class WeightsFile:
    name: str
    size: int


def weights_files(weights: TinkerWeights) -> list[WeightsFile]:
    """The files of a saved weights directory, as storage holds them now (only SERVED_FILES). An empty list
    when the directory is not (or no longer) there, or lies outside the object store."""
    uri = weights.uri
    if not objects.is_under(uri, settings.OBJECT_STORE_URL):
        return []
    sizes: dict[str, int] = {}
    try:
        if objects.scheme(uri) == "file":
            folder = storage.store().path(uri)
            if folder.is_dir():
                sizes = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}
        else:
            bucket, key = objects.bucket_key(uri)
            lister = storage.store().s3().get_paginator("list_objects_v2")
            pages = lister.paginate(Bucket=bucket, Prefix=key + "/")
            for page in pages:
                for item in page.get("Contents", []):
                    sizes[str(PurePosixPath(item["Key"]).relative_to(key))] = int(item["Size"])
    except ValueError:  # outside the store
        return []
    return [WeightsFile(name, sizes[name]) for name in SERVED_FILES if name in sizes]


def weights_file_uri(weights: TinkerWeights, name: str) -> str:
    """The storage URI of one served file of the weights; a 404 for any other name."""
    if name not in SERVED_FILES:
        raise NotFound("no such file")
    return storage.file_uri(weights.uri, name)


# ---- the admin console ----


@dataclass(frozen=True)
class ModelServerView:
    """What the console shows of one base model's model server: its queue in Valkey (None when Valkey does
    not answer), the calls PostgreSQL holds as pending, the training clients (adapters) of open sessions
    and the organizations they belong to; `server`: its model-server job's allocation (pool, state, started,
    released), None when the platform never started one (a server started by hand)."""

    base_model: str
    queued: int | None
    pending_calls: int
    adapters: list[dict[str, Any]]
    samplers: int
    server: ServerAllocation | None = None
    last_answered_at: datetime | None = None


def model_servers() -> list[ModelServerView]:
    open_models = TinkerModel.objects.filter(session__finished_at=None)
    bases = sorted(
        set(open_models.values_list("base_model", flat=True))
        | set(
            TinkerFuture.objects.filter(state=_PENDING).values_list("model__base_model", flat=True).distinct()
        )
    )
    pending = dict(
        TinkerFuture.objects.filter(state=_PENDING)
        .values_list("model__base_model")
        .annotate(n=Count("pk"))
        .values_list("model__base_model", "n")
    )
    live = Job.objects.filter(kind=MODEL_SERVER_KIND, state__in=[s.value for s in LIVE_STATES])
    bases = sorted(set(bases) | {str(j.spec["model_server"]["base_model"]) for j in live.only("spec")})
    depths = queue_depths(bases)
    servers = model_server_allocations(bases)
    # Idle since: the last call a server answered for the base (its idle exit counts from its last work).
    answered = dict(
        TinkerFuture.objects.filter(model__base_model__in=bases, completed_at__isnull=False)
        .values_list("model__base_model")
        .annotate(last=Max("completed_at"))
        .values_list("model__base_model", "last")
    )
    out = []
    for base in bases:
        adapters = [
            {
                "model_id": m.pk,
                "organization": m.organization.slug,
                "lora_rank": m.lora_rank,
                "steps": m.steps,
                "pending_calls": m.pending_calls,
            }
            for m in open_models.filter(base_model=base, kind=TinkerModel.Kind.TRAIN)
            .select_related("organization")
            .annotate(
                steps=Count("futures", filter=Q(futures__operation="optim_step", futures__state=_DONE)),
                pending_calls=Count("futures", filter=Q(futures__state=_PENDING)),
            )
            .order_by("organization__slug", "pk")
        ]
        samplers = open_models.filter(base_model=base, kind=TinkerModel.Kind.SAMPLE).count()
        out.append(
            ModelServerView(
                base,
                depths.get(base),
                pending.get(base, 0),
                adapters,
                samplers,
                servers.get(base),
                answered.get(base),
            )
        )
    return out


def queue_depths(bases: list[str]) -> dict[str, int]:
    """Operations waiting in each base model's Valkey queue; {} when Valkey does not answer (the console
    still shows what PostgreSQL knows)."""
    if not bases:
        return {}
    try:
        pipe = queue.client().pipeline(transaction=False)
        for base in bases:
            pipe.llen(queue.ops_key(base))
        return dict(zip(bases, (int(n) for n in pipe.execute()), strict=True))
    except redis.RedisError:  # the console renders while Valkey is down: the count reads "unknown"
        return {}


def base_model_has_live_session(base_model: str, since: datetime) -> bool:
    """Whether an unfinished session of any organization, heartbeating since `since`, has a training client or
    sampler on `base_model` (its client may call again: a lost model server for the base is restarted;
    registered with portal/services/model_servers.py at start-up)."""
    return TinkerModel.objects.filter(
        base_model=base_model, session__finished_at__isnull=True, session__last_heartbeat_at__gte=since
    ).exists()
