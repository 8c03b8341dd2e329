"""What the Tinker API's calls do: rows in PostgreSQL, operations on the base model's queue.

Every asynchronous call writes a future and, after the transaction commits, puts its operation on the queue
of the model server for the model's base (`queue`). A retried call (same model, same seq_id) is the same
call: it finds its first future, and queues it again only while that is pending (its first enqueue may have
been lost; the model server drops copies). Outcomes come back through `future_complete` (the
ingest endpoint), which writes the future and wakes its long-polls.
"""

from __future__ import annotations

import re
import urllib.parse
import uuid
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Max, Min, Q
from django.utils import timezone

from api.tinker import queue
from api.tinker.models import TinkerFuture, TinkerModel, TinkerSession, TinkerWeights
from opentinker.spec import MODEL_PRESETS
from portal.errors import NotFound
from portal.models import Membership, Organization
from portal.services.usage import tinker_usage_charge

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}\Z")
PATH_RE = re.compile(r"^tinker://(?P<run>[^/\s]+)/(?P<kind>weights|sampler_weights)/(?P<name>[^/\s]+)\Z")
SEQ_OPS = ("forward_backward", "optim_step", "sample", "save_weights", "save_weights_for_sampler")
# The largest seq_id / model_seq_id accepted: fits the BigInteger column and keeps a model id under 80 chars.
MAX_SEQ_ID = 2**53 - 1
# How far past a training client's next call a seq_id may be (the SDK sends a batch's chunks concurrently, a
# few ahead): calls far ahead would wait on the shared model server for a turn that may never come.
MAX_SEQ_AHEAD = 64


class TinkerUserError(ValueError):
    """A request the SDK sent wrong (unknown base model, bad name): a 400 the SDK does not retry."""


class TooBusy(Exception):
    """The organization has TINKER_MAX_PENDING_FUTURES calls in flight: a 429, which the SDK retries."""


class SessionFinished(TinkerUserError):
    """The session was finished (`ServiceClient.close`): nothing more runs in it; its heartbeat gets a 410."""


# ---- sessions ----


def session_create(membership: Membership, *, tags: list[str], sdk_version: str) -> TinkerSession:
    return TinkerSession.objects.create(
        organization=membership.organization,
        created_by=membership.user,
        tags=[str(t)[:100] for t in tags][:20],
        sdk_version=sdk_version[:40],
    )


def session_get(org: Organization, session_id: str) -> TinkerSession:
    session = TinkerSession.objects.filter(organization=org, pk=uuid_or_none(session_id)).first()
    if session is None:
        raise NotFound("no such session")
    return session


def session_open(org: Organization, session_id: str) -> TinkerSession:
    session = session_get(org, session_id)
    if session.finished_at is not None:
        raise SessionFinished(f"session {session.pk} is finished")
    return session


def session_heartbeat(org: Organization, session_id: str) -> TinkerSession:
    session = session_open(org, session_id)
    TinkerSession.objects.filter(pk=session.pk).update(last_heartbeat_at=timezone.now())
    return session


def session_finish(org: Organization, session_id: str, reason: str) -> None:
    session = session_get(org, session_id)
    TinkerSession.objects.filter(pk=session.pk, finished_at=None).update(
        finished_at=timezone.now(), finish_reason=reason[:20]
    )


def uuid_or_none(value: str) -> uuid.UUID | None:
    """The id as a UUID, or None (which matches no row) for anything else: never a 500 on a bad id."""
    try:
        return uuid.UUID(str(value)[:40])
    except ValueError:
        return None


# ---- models ----


def _check_base(base_model: str) -> None:
    if base_model not in MODEL_PRESETS:
        raise TinkerUserError(f"unknown base_model {base_model!r}; known: {sorted(MODEL_PRESETS)}")


def model_get(org: Organization, model_id: str) -> TinkerModel:
    model = (
        TinkerModel.objects.select_related("session").filter(organization=org, pk=str(model_id)[:80]).first()
    )
    if model is None:
        raise NotFound("no such model")
    return model


def model_create(
    org: Organization, session_id: str, model_seq_id: int, base_model: str, lora_config: dict[str, Any]
) -> TinkerFuture:
    """A training client with a fresh adapter. Its id is the one the SDK computes for load_weights."""
    _check_base(base_model)
    rank = bounded_int(lora_config.get("rank") or 32, "lora_config.rank", 1, 512)
    seed = lora_config.get("seed")
    config = {
        "rank": rank,
        "seed": None if seed is None else bounded_int(seed, "lora_config.seed", 0, 2**63 - 1),
        "train_mlp": bool(lora_config.get("train_mlp", True)),
        "train_attn": bool(lora_config.get("train_attn", True)),
        "train_unembed": bool(lora_config.get("train_unembed", True)),
    }
    return _model_with_future(
        org, session_id, model_seq_id, base_model, rank, "create_model", {"lora_config": config}
    )


def model_load(
    org: Organization, session_id: str, model_seq_id: int, path: str, *, optimizer: bool
) -> TinkerFuture:
    """A training client resumed from a saved state (`create_training_client_from_state[_with_optimizer]`)."""
    weights = weights_get(org, path)
    if weights.kind != "weights":
        raise TinkerUserError("load_weights needs a save_state path (tinker://.../weights/...)")
    base, rank = weights.model.base_model, weights.model.lora_rank
    op = {"uri": weights.uri, "optimizer": bool(optimizer)}
    return _model_with_future(org, session_id, model_seq_id, base, rank, "load_weights", op)


def _model_with_future(
    org: Organization,
    session_id: str,
    model_seq_id: int,
    base_model: str,
    rank: int | None,
    operation: str,
    op: dict[str, Any],
) -> TinkerFuture:
    session = session_open(org, session_id)
    model_id = f"{session.pk}:train:{bounded_int(model_seq_id, 'model_seq_id')}"
    encoded(op)  # a number JSON cannot carry is refused here, before any row exists
    with transaction.atomic():
        model, created = TinkerModel.objects.get_or_create(
            pk=model_id,
            defaults={
                "organization": org,
                "session": session,
                "kind": TinkerModel.Kind.TRAIN,
                "base_model": base_model,
                "lora_rank": rank,
            },
        )
        if not created:  # a retry: the same call
            first = model.futures.filter(seq_id=None).order_by("created_at").first()
            if first is not None and first.state == TinkerFuture.State.PENDING:
                _requeue(base_model, {"op": operation, "future": str(first.pk), "model_id": model_id, **op})
            return first  # type: ignore[return-value]
        _admit(org)
        future = TinkerFuture.objects.create(organization=org, model=model, operation=operation)
        message = {"op": operation, "future": str(future.pk), "model_id": model_id, **op}
        transaction.on_commit(lambda: queue.enqueue(base_model, message))
    return future


def sampler_create(
    org: Organization,
    session_id: str,
    sampling_session_seq_id: int,
    *,
    base_model: str | None,
    model_path: str | None,
) -> TinkerModel:
    """A sampling client: the base model, or saved weights. Its model server loads it when the queue
    reaches it, before any of its samples (same queue, FIFO)."""
    session = session_open(org, session_id)
    uri = None
    if model_path:
        weights = weights_get(org, model_path)
        base_model, uri = weights.model.base_model, weights.uri
    if not base_model:
        raise TinkerUserError("create_sampling_session needs base_model or model_path")
    _check_base(base_model)
    seq = bounded_int(sampling_session_seq_id, "sampling_session_seq_id")
    return _sampler(org, session, seq, base_model, uri, model_path or "")


def _sampler(
    org: Organization, session: TinkerSession, seq: int, base_model: str, uri: str | None, path: str
) -> TinkerModel:
    sampler_id = f"{session.pk}:sample:{seq}"
    with transaction.atomic():
        model, created = TinkerModel.objects.get_or_create(
            pk=sampler_id,
            defaults={
                "organization": org,
                "session": session,
                "kind": TinkerModel.Kind.SAMPLE,
                "base_model": base_model,
                "source_path": path,
            },
        )
        message = {"op": "create_sampler", "model_id": sampler_id, "uri": uri}
        if created:
            transaction.on_commit(lambda: queue.enqueue(base_model, message))
        else:  # a retry (the first enqueue may have failed); the model server skips a sampler it has
            _requeue(base_model, message)
    return model


# ---- ordered calls ----


def call_submit(
    org: Organization,
    model_id: str,
    seq_id: int | None,
    operation: str,
    op: dict[str, Any],
    *,
    request: dict[str, Any] | None = None,
) -> TinkerFuture:
    """Queue one seq-ordered call of a model (a training client or a sampler)."""
    assert operation in SEQ_OPS
    model = model_get(org, model_id)
    if seq_id is None:
        raise TinkerUserError("seq_id is required")
    if model.session.finished_at is not None:
        raise SessionFinished(f"session {model.session_id} is finished")
    trains = operation in ("forward_backward", "optim_step", "save_weights")
    if trains and model.kind != TinkerModel.Kind.TRAIN:
        raise TinkerUserError(f"{operation} needs a training client")
    if operation == "sample" and model.kind == TinkerModel.Kind.SAMPLE:
        # What the sampler was created from: a model server that restarted since re-creates it from this.
        source = weights_get(org, model.source_path).uri if model.source_path else None
        op = {**op, "sampler_uri": source}
    existing = TinkerFuture.objects.filter(model=model, seq_id=seq_id).first()
    if existing is not None:
        if existing.state == TinkerFuture.State.PENDING:
            message = {"op": operation, "future": str(existing.pk), "model_id": model.pk, "seq_id": seq_id}
            _requeue(model.base_model, {**message, **op})
        return existing
    _admit(org)
    if model.kind == TinkerModel.Kind.TRAIN:
        _check_ahead(model, seq_id)
    try:
        encoded(op)
    except TinkerUserError as exc:
        # Refused before the future exists, through the reject path: the seq_id's turn is still taken.
        call_reject(org, model_id, seq_id, str(exc), operation)
        raise
    try:
        with transaction.atomic():
            future = TinkerFuture.objects.create(
                organization=org, model=model, operation=operation, seq_id=seq_id, request=request or {}
            )
            message = {"op": operation, "future": str(future.pk), "model_id": model.pk, "seq_id": seq_id}
            message.update(op)
            transaction.on_commit(lambda: queue.enqueue(model.base_model, message))
    except IntegrityError:  # the same call, retried concurrently: the first one wins
        return TinkerFuture.objects.get(model=model, seq_id=seq_id)
    return future


def _requeue(base_model: str, message: dict[str, Any]) -> None:
    """A retry of a call still pending: its first enqueue may have been lost (Valkey down at commit, a 500 to
    the client), so it is queued again. The model server drops the copy: a seq_id it has queued or run (by
    `(model, seq_id)`), a sample whose future it has, a model or sampler it has (the ingest keeps a future's
    first outcome). An error here (Valkey still down) is a 500, which the SDK retries."""
    try:
        encoded(message)
    except TinkerUserError:
        return  # not what the first call sent: that one is the call, and this copy is not queued
    transaction.on_commit(lambda: queue.enqueue(base_model, message))


def _admit(org: Organization) -> None:
    limit = settings.TINKER_MAX_PENDING_FUTURES
    if TinkerFuture.objects.filter(organization=org, state=TinkerFuture.State.PENDING).count() >= limit:
        raise TooBusy(f"{limit} calls of this organization are in flight; retry when some are done")


def _check_ahead(model: TinkerModel, seq_id: int) -> None:
    """Refuse a seq_id more than MAX_SEQ_AHEAD past the model's next call as the futures show it: its lowest
    pending seq_id, or the one after its last. (A client filling the window one by one behind a gap moves it;
    the pending-futures limit and the model server's own SEQ_AHEAD_LIMIT bound that.)"""
    seen = model.futures.exclude(seq_id=None).aggregate(
        low=Min("seq_id", filter=Q(state=TinkerFuture.State.PENDING)), high=Max("seq_id")
    )
    next_seq = seen["low"] if seen["low"] is not None else (seen["high"] or 0) + 1
    if seq_id > next_seq + MAX_SEQ_AHEAD:
        raise TinkerUserError(f"seq_id {seq_id} is more than {MAX_SEQ_AHEAD} past the next call ({next_seq})")


def bounded_int(value: Any, name: str, lo: int = 0, hi: int = MAX_SEQ_ID) -> int:
    """An integer field of a request, in [lo, hi]; anything else (a list, 1e400, NaN, "x") is a user error."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise TinkerUserError(f"{name} must be an integer")
    try:
        number = int(value)
    except (OverflowError, ValueError):
        raise TinkerUserError(f"{name} must be an integer") from None
    if not lo <= number <= hi:
        raise TinkerUserError(f"{name} must be in [{lo}, {hi}]")
    return number


def encoded(op: dict[str, Any]) -> str:
    """The operation as the queue's JSON. Python's json reads NaN and Infinity but the queue's JSON (and
    jsonb) has none: such a call must be refused while the client can still be told, not after commit."""
    try:
        return queue.encode(op)
    except ValueError:
        raise TinkerUserError("numbers must be finite (no NaN or Infinity)") from None


def call_reject(
    org: Organization, model_id: str, seq_id: int | None, error: str, operation: str = "forward_backward"
) -> None:
    """A training client's call the API refused (a body it could not decode, a bad name or number): its
    future fails, and the model server is told to skip its seq_id, so the later calls do not wait for it
    forever. (A sampler's calls need no order: nothing to skip.)"""
    model = model_get(org, model_id)
    if seq_id is None or model.kind != TinkerModel.Kind.TRAIN:
        return
    with transaction.atomic():
        _, created = TinkerFuture.objects.get_or_create(
            model=model,
            seq_id=seq_id,
            defaults={
                "organization": org,
                "operation": operation,
                "state": TinkerFuture.State.FAILED,
                "error": error[:10000],
                "error_category": "user",
                "completed_at": timezone.now(),
            },
        )
        if created:
            message = {"op": "reject", "model_id": model.pk, "seq_id": seq_id, "error": error[:10000]}
            transaction.on_commit(lambda: queue.enqueue(model.base_model, message))


def weights_uri(org: Organization, model: TinkerModel, kind: str, name: str) -> str:
    base = settings.OBJECT_STORE_URL.rstrip("/")
    run = urllib.parse.quote(model.pk, safe="")
    return f"{base}/tinker/{org.pk}/{run}/{kind}/{name}"


def save_submit(
    org: Organization,
    model_id: str,
    seq_id: int | None,
    *,
    for_sampler: bool,
    name: str | None,
    sampling_session_seq_id: int | None = None,
) -> TinkerFuture:
    """`save_weights` (state with Adam) or `save_weights_for_sampler` (a PEFT adapter), named or, for
    `save_weights_and_get_sampling_client`, ephemeral (then a sampler on it comes with the result)."""
    model = model_get(org, model_id)
    kind = "sampler_weights" if for_sampler else "weights"
    operation = "save_weights_for_sampler" if for_sampler else "save_weights"
    if name is None and sampling_session_seq_id is not None:
        name = f"ephemeral-{seq_id}"
    if name is None or not NAME_RE.match(str(name)):
        error = "path must be a name of letters, digits, '.', '_' or '-' (at most 100)"
        call_reject(org, model_id, seq_id, error, operation)
        raise TinkerUserError(error)
    uri = weights_uri(org, model, kind, name)
    request = {"kind": kind, "name": name, "uri": uri, "sampling_session_seq_id": sampling_session_seq_id}
    return call_submit(
        org, model_id, seq_id, operation, {"uri": uri, "for_sampler": for_sampler}, request=request
    )


def weights_get(org: Organization, path: str) -> TinkerWeights:
    m = PATH_RE.match(str(path))
    if m is None:
        raise TinkerUserError(f"not a tinker:// weights path: {str(path)[:200]!r}")
    weights = (
        TinkerWeights.objects.select_related("model")
        .filter(organization=org, model_id=m["run"], kind=m["kind"], name=m["name"])
        .first()
    )
    if weights is None:
        raise NotFound("no such weights")
    return weights


# ---- outcomes (the model server, through the ingest) ----


def future_complete(
    base_model: str,
    future_id: str,
    *,
    result: dict[str, Any] | None = None,
    error: str = "",
    category: str = "",
    usage: Any = None,
) -> TinkerFuture:
    """Write a call's outcome, as the model server of `base_model` reports it. Idempotent: a future already
    completed keeps its first outcome (a model server may report twice after a lost answer), and its
    `usage` (`{"tokens", "seconds"}`) is charged to the future's organization once, with that outcome."""
    with transaction.atomic():
        future = (
            TinkerFuture.objects.select_for_update()
            .select_related("model__session", "organization")
            .filter(pk=uuid_or_none(future_id), model__base_model=base_model)
            .first()
        )
        if future is None:
            raise NotFound("no such future")
        if future.state != TinkerFuture.State.PENDING:
            return future
        future.completed_at = timezone.now()
        if result is None:
            future.state = TinkerFuture.State.FAILED
            future.error = (error or "the model server reported no result")[:10000]
            future.error_category = category if category in ("user", "server") else "unknown"
        else:
            future.state = TinkerFuture.State.DONE
            future.result = _reply(future, result)
        future.save()
        tokens, seconds = _usage(usage)
        tinker_usage_charge(
            organization_id=future.organization_id, when=future.completed_at, tokens=tokens, seconds=seconds
        )
        transaction.on_commit(lambda: queue.announce_done(str(future.pk)))
    return future


# One call's usage at most (a model server's report is trusted, but a broken number must not poison a month).
MAX_CALL_TOKENS, MAX_CALL_SECONDS = 10**9, 86400.0


def _usage(usage: Any) -> tuple[int, float]:
    """(tokens, seconds) of a reported usage; (0, 0) for anything that is not two sane numbers."""
    if not isinstance(usage, dict):
        return 0, 0.0
    tokens, seconds = usage.get("tokens", 0), usage.get("seconds", 0.0)
    if isinstance(tokens, bool) or not isinstance(tokens, int) or not 0 <= tokens <= MAX_CALL_TOKENS:
        tokens = 0
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, int | float)
        or not 0 <= seconds <= MAX_CALL_SECONDS
    ):
        seconds = 0.0
    return tokens, float(seconds)


def _reply(future: TinkerFuture, result: dict[str, Any]) -> dict[str, Any]:
    """What the SDK gets back, in its shape (protobuf results are encoded when retrieved)."""
    model = future.model
    if future.operation in ("create_model", "load_weights"):
        return {"type": future.operation, "model_id": model.pk}
    if future.operation in ("save_weights", "save_weights_for_sampler"):
        req = future.request
        TinkerWeights.objects.get_or_create(
            model=model,
            kind=req["kind"],
            name=req["name"],
            defaults={"organization": future.organization, "uri": req["uri"]},
        )
        path = f"tinker://{model.pk}/{req['kind']}/{req['name']}"
        if req.get("sampling_session_seq_id") is not None:
            sampler = _sampler(
                future.organization,
                model.session,
                int(req["sampling_session_seq_id"]),
                model.base_model,
                req["uri"],
                path,
            )
            return {"type": future.operation, "path": path, "sampling_session_id": sampler.pk}
        return {"type": future.operation, "path": path}
    return result
