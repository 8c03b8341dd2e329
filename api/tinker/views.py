"""The endpoints the official `tinker` SDK calls (`/tinker/api/v1/...`) and the model server's ingest.

Plain Django views rather than DRF: the SDK, not our REST conventions, fixes the wire (a `"type"` field in
JSON bodies, a protobuf body for `forward_backward`, protobuf results, `X-API-Key: tml-...`). Every call
but `retrieve_future` is short and synchronous; `retrieve_future` is async and holds the poll open on a
Valkey channel until the outcome is written or `TINKER_POLL_HOLD_SECONDS` (settings) pass. Every middleware
is async-capable (portal/async_middleware.py), so under ASGI the poll waits on the event loop; its two short
queries run in the request's own thread (Django gives each ASGI request one, parked while the poll waits:
it is not a slot of a shared pool), and the database connection is given back before the hold, so held
polls do not take the process's pool of connections (DB_POOL_MAX_SIZE) from other requests.

Errors: 401 for a bad key, 404 for anything of another organization (the SDK stops at once on 404), 400
for a request the SDK sent wrong. A failed call is a 200 `{"error", "category"}` from `retrieve_future`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_http_methods

from api.tinker import codec, queue, selectors, services
from api.tinker.auth import TinkerAuthError, authenticate, authenticate_model_server
from api.tinker.models import TinkerFuture
from portal.errors import NotFound
from portal.models import Membership

PROTOBUF = "application/x-protobuf"


def _error(status: int, message: str, category: str = "user") -> JsonResponse:
    return JsonResponse({"error": message, "category": category}, status=status)


def _body(request: HttpRequest, limit: int | None = None) -> bytes:
    limit = limit or settings.TINKER_MAX_BODY_BYTES
    try:
        size = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        raise services.TinkerUserError("Content-Length is not a number") from None
    if size > limit:
        raise services.TinkerUserError(f"request body is {size} bytes; the limit is {limit}")
    body = request.read(limit + 1)
    if len(body) > limit:  # no Content-Length, or a wrong one
        raise services.TinkerUserError(f"request body is over the limit of {limit} bytes")
    return body


def _json(request: HttpRequest, limit: int | None = None) -> dict[str, Any]:
    try:
        data = json.loads(_body(request, limit) or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise services.TinkerUserError("the body is not JSON") from None
    if not isinstance(data, dict):
        raise services.TinkerUserError("the body must be a JSON object")
    return data


def tinker_call(methods: tuple[str, ...] = ("POST",)) -> Callable[..., Any]:
    """An SDK endpoint: authenticated by X-API-Key, errors in the shape the SDK reads."""

    def wrap(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
        @csrf_exempt
        @require_http_methods(list(methods))
        @functools.wraps(view)
        def inner(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            try:
                membership = authenticate(request)
                return view(request, membership, *args, **kwargs)
            except TinkerAuthError as exc:
                return _error(exc.status, str(exc))
            except NotFound as exc:
                return _error(404, str(exc) or "not found")
            except (services.TinkerUserError, codec.CodecError, KeyError, TypeError, ValueError) as exc:
                return _error(400, _describe(exc))
            except services.TooBusy as exc:
                return _error(429, str(exc), "server")
            except (AttributeError, OverflowError) as exc:  # a body of the wrong shape (a list, 1e400)
                return _error(400, f"malformed request: {exc}")

        return inner

    return wrap


def _describe(exc: Exception) -> str:
    return f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)


def _future(future: TinkerFuture, **extra: Any) -> JsonResponse:
    return JsonResponse({"request_id": str(future.pk), **extra})


# ---- client and session ----


@tinker_call()
def client_config(request: HttpRequest, membership: Membership) -> HttpResponse:
    return JsonResponse({})  # the SDK's defaults; no server-side custom losses, no batched futures poll


@tinker_call()
def create_session(request: HttpRequest, membership: Membership) -> HttpResponse:
    body = _json(request)
    session = services.session_create(
        membership, tags=list(body.get("tags") or []), sdk_version=str(body.get("sdk_version") or "")
    )
    return JsonResponse({"type": "create_session", "session_id": str(session.pk)})


@tinker_call()
def session_heartbeat(request: HttpRequest, membership: Membership) -> HttpResponse:
    try:
        services.session_heartbeat(membership.organization, str(_json(request)["session_id"]))
    except services.SessionFinished as exc:
        return _error(410, str(exc))  # the SDK stops its heartbeat loop
    return JsonResponse({"type": "session_heartbeat"})


@tinker_call()
def session_finish(request: HttpRequest, membership: Membership, session_id: str) -> HttpResponse:
    reason = _json(request).get("reason") or ""
    if isinstance(reason, dict):
        reason = reason.get("type") or ""
    services.session_finish(membership.organization, session_id, str(reason))
    return JsonResponse({})


@tinker_call()
def telemetry(request: HttpRequest, membership: Membership) -> HttpResponse:
    _body(request)  # accepted and dropped: our own metrics come from the server side
    return JsonResponse({"status": "accepted"})


# ---- models ----


@tinker_call()
def create_model(request: HttpRequest, membership: Membership) -> HttpResponse:
    body = _json(request)
    future = services.model_create(
        membership.organization,
        str(body["session_id"]),
        body["model_seq_id"],
        str(body["base_model"]),
        _object(body.get("lora_config"), "lora_config"),
    )
    return _future(future, model_id=future.model_id)


@tinker_call()
def load_weights(request: HttpRequest, membership: Membership) -> HttpResponse:
    body = _json(request)
    if body.get("session_id") is None or body.get("model_seq_id") is None:
        raise services.TinkerUserError("load_weights into an existing model is not supported yet")
    future = services.model_load(
        membership.organization,
        str(body["session_id"]),
        body["model_seq_id"],
        str(body["path"]),
        optimizer=bool(body.get("optimizer")),
    )
    return _future(future, model_id=future.model_id)


@tinker_call()
def get_info(request: HttpRequest, membership: Membership) -> HttpResponse:
    model = services.model_get(membership.organization, str(_json(request)["model_id"]))
    return JsonResponse(
        {
            "type": "get_info",
            "model_id": model.pk,
            "model_data": {"model_name": model.base_model, "arch": None, "tokenizer_id": None},
            "is_lora": True,
            "lora_rank": model.lora_rank,
        }
    )


# ---- training ----


@tinker_call()
def forward_backward(request: HttpRequest, membership: Membership) -> HttpResponse:
    body = _body(request)
    try:
        op = codec.decode_forward_backward(body)
    except codec.CodecError as exc:
        called = codec.call_id(body)
        if called is not None:
            services.call_reject(membership.organization, *called, str(exc))
        raise
    model_id, seq_id = op.pop("model_id"), op.pop("seq_id")
    seq_id = services.bounded_int(seq_id, "seq_id", 1)
    error = _too_many_tokens([len(d["model_input"]) for d in op["data"]])
    if error:
        services.call_reject(membership.organization, model_id, seq_id, error)  # keeps the order
        raise services.TinkerUserError(error)
    future = services.call_submit(membership.organization, model_id, seq_id, "forward_backward", op)
    return _future(future, model_id=model_id)


ADAM_FIELDS = ("learning_rate", "beta1", "beta2", "eps", "weight_decay", "grad_clip_norm")


@tinker_call()
def optim_step(request: HttpRequest, membership: Membership) -> HttpResponse:
    body = _json(request)
    model_id, seq = str(body["model_id"]), _seq(body)
    params = body.get("adam_params") or body.get("optim_params") or body.get("optimizer_params") or {}
    try:
        params = _object(params, "adam_params")
        adam = {k: float(params[k]) for k in ADAM_FIELDS if params.get(k) is not None}
    except (TypeError, ValueError, OverflowError) as exc:
        error = f"adam_params: {exc}"
        services.call_reject(membership.organization, model_id, seq, error, "optim_step")  # keeps the order
        raise services.TinkerUserError(error) from None
    future = services.call_submit(membership.organization, model_id, seq, "optim_step", {"adam_params": adam})
    return _future(future, model_id=model_id)


def _seq(body: dict[str, Any]) -> int | None:
    return None if body.get("seq_id") is None else services.bounded_int(body["seq_id"], "seq_id")


def _object(value: Any, name: str) -> dict[str, Any]:
    """A field that must be a JSON object (or absent)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise services.TinkerUserError(f"{name} must be an object")
    return value


@tinker_call()
def save_weights(request: HttpRequest, membership: Membership) -> HttpResponse:
    body = _json(request)
    model_id = str(body["model_id"])
    future = services.save_submit(
        membership.organization, model_id, _seq(body), for_sampler=False, name=body.get("path")
    )
    return _future(future, model_id=model_id)


@tinker_call()
def save_weights_for_sampler(request: HttpRequest, membership: Membership) -> HttpResponse:
    body = _json(request)
    model_id = str(body["model_id"])
    seq = body.get("sampling_session_seq_id")
    future = services.save_submit(
        membership.organization,
        model_id,
        _seq(body),
        for_sampler=True,
        name=body.get("path"),
        sampling_session_seq_id=None if seq is None else services.bounded_int(seq, "sampling_session_seq_id"),
    )
    return _future(future, model_id=model_id)


# ---- sampling ----


@tinker_call()
def create_sampling_session(request: HttpRequest, membership: Membership) -> HttpResponse:
    body = _json(request)
    sampler = services.sampler_create(
        membership.organization,
        str(body["session_id"]),
        body["sampling_session_seq_id"],
        base_model=body.get("base_model"),
        model_path=body.get("model_path"),
    )
    return JsonResponse({"type": "create_sampling_session", "sampling_session_id": sampler.pk})


@tinker_call(("GET",))
def get_sampler(request: HttpRequest, membership: Membership, sampler_id: str) -> HttpResponse:
    sampler = services.model_get(membership.organization, sampler_id)
    path = sampler.source_path or None
    return JsonResponse({"sampler_id": sampler.pk, "base_model": sampler.base_model, "model_path": path})


SAMPLING_FIELDS = ("max_tokens", "seed", "stop", "temperature", "top_k", "top_p")


@tinker_call()
def asample(request: HttpRequest, membership: Membership) -> HttpResponse:
    body = _json(request)
    if not body.get("sampling_session_id"):
        raise services.TinkerUserError("asample needs a sampling_session_id (create_sampling_session)")
    prompt: list[int] = []
    chunks = _object(body["prompt"], "prompt").get("chunks")
    if not isinstance(chunks, list):
        raise services.TinkerUserError("prompt.chunks must be a list")
    for chunk in chunks:
        chunk = _object(chunk, "a prompt chunk")
        if chunk.get("type", "encoded_text") != "encoded_text":
            raise services.TinkerUserError("only encoded_text chunks are supported (no images or audio)")
        if not isinstance(chunk.get("tokens"), list):
            raise services.TinkerUserError("a prompt chunk's tokens must be a list")
        prompt += [services.bounded_int(t, "a token", 0, 2**31 - 1) for t in chunk["tokens"]]
    num_samples = services.bounded_int(body.get("num_samples") or 1, "num_samples", 1, 128)
    params = _sampling_params(_object(body.get("sampling_params"), "sampling_params"))
    context = settings.TINKER_MAX_CONTEXT_TOKENS
    if len(prompt) + int(params.get("max_tokens") or 0) > context:
        raise services.TinkerUserError(
            f"the prompt ({len(prompt)} tokens) plus max_tokens is over the limit of {context} "
            "(TINKER_MAX_CONTEXT_TOKENS)"
        )
    op = {
        "prompt": prompt,
        "num_samples": num_samples,
        "sampling_params": params,
        "prompt_logprobs": bool(body.get("prompt_logprobs")),
    }
    future = services.call_submit(
        membership.organization, str(body["sampling_session_id"]), _seq(body), "sample", op
    )
    ids = [f"{future.pk}:{i}" for i in range(num_samples)]
    return _future(future, sample_sequence_ids=ids)


def _too_many_tokens(lengths: list[int]) -> str:
    """Why a forward_backward's data are too much work for the shared model server ("" if they are not)."""
    context, call = settings.TINKER_MAX_CONTEXT_TOKENS, settings.TINKER_MAX_CALL_TOKENS
    if lengths and max(lengths) > context:
        return f"a datum has {max(lengths)} tokens; the limit is {context} (TINKER_MAX_CONTEXT_TOKENS)"
    if sum(lengths) > call:
        return f"the call has {sum(lengths)} tokens; the limit is {call} (TINKER_MAX_CALL_TOKENS)"
    return ""


def _sampling_params(given: dict[str, Any]) -> dict[str, Any]:
    """The known fields, each of its type; numbers finite (a NaN would never reach the model server)."""
    params = {k: v for k, v in given.items() if k in SAMPLING_FIELDS and v is not None}
    if "max_tokens" in params:
        params["max_tokens"] = services.bounded_int(params["max_tokens"], "sampling_params.max_tokens", 1)
    if "seed" in params:
        params["seed"] = services.bounded_int(params["seed"], "sampling_params.seed", -(2**63), 2**63 - 1)
    if "top_k" in params:  # -1 (the SDK's default) or 0: off; k: the k most likely tokens only
        params["top_k"] = services.bounded_int(params["top_k"], "sampling_params.top_k", -1, 2**31 - 1)
    for k in ("temperature", "top_p"):
        if k in params:
            if isinstance(params[k], bool) or not isinstance(params[k], int | float):
                raise services.TinkerUserError(f"sampling_params.{k} must be a number")
            if not math.isfinite(params[k]):
                raise services.TinkerUserError(f"sampling_params.{k} must be finite")
    if params.get("temperature", 1) < 0:
        raise services.TinkerUserError("sampling_params.temperature must be >= 0 (0 = greedy)")
    if not 0 < params.get("top_p", 1) <= 1:
        raise services.TinkerUserError("sampling_params.top_p must be in (0, 1]")
    stop = params.get("stop")
    if stop is not None and not isinstance(stop, str | list):
        raise services.TinkerUserError("sampling_params.stop must be a string or a list")
    if "stop" in given and given["stop"] is None:
        params["stop"] = None
    return params


# ---- lists (the SDK's RestClient: list_sessions, list_training_runs, list_user_checkpoints, ...) ----

MAX_PAGE = 200  # as the REST lists (api.common.Pagination.max_limit): a larger limit is a 400


def _page(request: HttpRequest, default: int) -> tuple[int, int]:
    """(limit, offset) of a list call; the SDK's `access_scope` is accepted ("accessible" is what the
    organization owns: nothing is shared across organizations) and a `project_id` refused (no projects)."""
    known = {"limit", "offset", "access_scope"}
    unknown = sorted(set(request.GET) - known)
    if unknown:
        raise services.TinkerUserError(f"unknown parameter(s) {unknown}; a list takes {sorted(known)}")
    if request.GET.get("access_scope", "owned") not in ("owned", "accessible"):
        raise services.TinkerUserError("access_scope must be 'owned' or 'accessible'")
    limit = services.bounded_int(request.GET.get("limit", default), "limit", 1, MAX_PAGE)
    offset = services.bounded_int(request.GET.get("offset", 0), "offset", 0, 2**31 - 1)
    return limit, offset


def _cursor(limit: int, offset: int, total: int) -> dict[str, int]:
    return {"offset": offset, "limit": limit, "total_count": total}


_CHECKPOINT_TYPES = {"weights": "training", "sampler_weights": "sampler"}


def _checkpoint(w: Any) -> dict[str, Any]:
    return {
        "checkpoint_id": f"{w.kind}/{w.name}",
        "checkpoint_type": _CHECKPOINT_TYPES.get(w.kind, "training"),
        "time": w.created_at.isoformat(),
        "tinker_path": selectors.weights_path(w),
        "size_bytes": None,
        "public": False,
    }


@tinker_call(("GET",))
def list_sessions(request: HttpRequest, membership: Membership) -> HttpResponse:
    limit, offset = _page(request, 20)
    sessions = selectors.session_list(membership.organization)
    return JsonResponse({"sessions": [str(s.pk) for s in sessions[offset : offset + limit]]})


@tinker_call(("GET",))
def list_training_runs(request: HttpRequest, membership: Membership) -> HttpResponse:
    limit, offset = _page(request, 20)
    models = selectors.model_list(membership.organization)
    page = list(models.select_related("session__created_by")[offset : offset + limit])
    latest: dict[tuple[str, str], Any] = {}
    for w in (
        selectors.weights_list(membership.organization).filter(model__in=page).order_by("created_at", "pk")
    ):
        latest[(w.model_id, w.kind)] = w  # the newest of each kind wins
    runs = []
    for m in page:
        owner = m.session.created_by
        last = latest.get((m.pk, "weights")), latest.get((m.pk, "sampler_weights"))
        runs.append(
            {
                "training_run_id": m.pk,
                "base_model": m.base_model,
                "model_owner": owner.username if owner else membership.organization.slug,
                "is_lora": m.lora_rank is not None,
                "corrupted": False,
                "lora_rank": m.lora_rank,
                "last_request_time": (m.last_call_at or m.created_at).isoformat(),
                "last_checkpoint": _checkpoint(last[0]) if last[0] else None,
                "last_sampler_checkpoint": _checkpoint(last[1]) if last[1] else None,
            }
        )
    return JsonResponse({"training_runs": runs, "cursor": _cursor(limit, offset, models.count())})


@tinker_call(("GET",))
def list_user_checkpoints(request: HttpRequest, membership: Membership) -> HttpResponse:
    limit, offset = _page(request, 100)
    weights = selectors.weights_list(membership.organization)
    items = [_checkpoint(w) for w in weights[offset : offset + limit]]
    return JsonResponse({"checkpoints": items, "cursor": _cursor(limit, offset, weights.count())})


@tinker_call(("GET",))
def list_checkpoints(request: HttpRequest, membership: Membership, model_id: str) -> HttpResponse:
    """One training run's checkpoints, newest first (the SDK reads this one unpaginated: cursor null)."""
    weights = selectors.weights_list(membership.organization, model_id=model_id)
    return JsonResponse({"checkpoints": [_checkpoint(w) for w in weights], "cursor": None})


# ---- futures ----


def _reply(future: TinkerFuture) -> HttpResponse:
    if future.state == TinkerFuture.State.PENDING:
        return JsonResponse({"type": "try_again", "request_id": str(future.pk), "queue_state": "active"})
    if future.state == TinkerFuture.State.FAILED:
        return JsonResponse({"error": future.error, "category": future.error_category or "unknown"})
    assert future.result is not None
    if future.operation == "forward_backward":
        return HttpResponse(codec.encode_forward_backward_output(future.result), content_type=PROTOBUF)
    if future.operation == "sample":
        return HttpResponse(codec.encode_sample_response(future.result), content_type=PROTOBUF)
    return JsonResponse(future.result)


def _lookup(request: HttpRequest) -> tuple[Membership, str]:
    membership = authenticate(request)
    return membership, str(_json(request)["request_id"])


def _future_of(membership: Membership, future_id: str, *, release: bool = False) -> TinkerFuture:
    pk = services.uuid_or_none(future_id)
    try:
        future = TinkerFuture.objects.filter(organization=membership.organization, pk=pk).first()
    finally:
        if release and not connection.in_atomic_block:
            # Before a hold: the connection goes back to the pool (or is closed) rather than idling for up to
            # TINKER_POLL_HOLD_SECONDS; enough held polls would otherwise take every pooled connection.
            connection.close()
    if future is None:
        raise NotFound("no such future")
    return future


@csrf_exempt
@require_http_methods(["POST"])
async def retrieve_future(request: HttpRequest) -> HttpResponse:
    try:
        membership, future_id = await sync_to_async(_lookup)(request)
        hold = float(settings.TINKER_POLL_HOLD_SECONDS)
        r = aioredis.Redis.from_url(settings.REDIS_URL)
        try:
            async with r.pubsub() as pubsub:
                # Subscribed (confirmed) before reading the row: an outcome written in between still wakes
                # this poll.
                await subscribe(pubsub, queue.done_channel(future_id), hold)
                future = await sync_to_async(_future_of)(membership, future_id, release=True)
                if future.state == TinkerFuture.State.PENDING:
                    await _wait(pubsub, hold)
                    future = await sync_to_async(_future_of)(membership, future_id)
        finally:
            await r.aclose()
        return await sync_to_async(_reply)(future)
    except TinkerAuthError as exc:
        return _error(exc.status, str(exc))
    except NotFound as exc:
        return _error(404, str(exc) or "not found")
    except (services.TinkerUserError, KeyError, TypeError, ValueError) as exc:
        return _error(400, _describe(exc))


async def subscribe(pubsub: Any, channel: str, timeout: float) -> None:
    """Subscribe and wait for Valkey's confirmation: redis-py's subscribe() only sends the command, and a
    publish the server handles before it would be missed. (A poll without it still ends at its hold.)"""
    await pubsub.subscribe(channel)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (left := deadline - loop.time()) > 0:
        message = await pubsub.get_message(timeout=left)
        if message is not None and message["type"] == "subscribe":
            return


async def _wait(pubsub: Any, hold: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + hold
    while (left := deadline - loop.time()) > 0:
        if await pubsub.get_message(ignore_subscribe_messages=True, timeout=left) is not None:
            return


# ---- the model server's ingest ----


@csrf_exempt
@require_http_methods(["POST"])
def ingest_outcomes(request: HttpRequest) -> HttpResponse:
    """`{"outcomes": [{"future", "result" | "error" + "category", "usage"?}]}` from the model server of
    the token's base model. Unknown futures (or another base's) are counted, not written."""
    base_model = authenticate_model_server(request)
    if base_model is None:
        return _error(401, "invalid or expired model server token")
    try:
        outcomes = _json(request, settings.TINKER_MAX_INGEST_BYTES)["outcomes"]
        written, unknown = 0, 0
        for o in outcomes:
            try:
                services.future_complete(
                    base_model,
                    str(o["future"]),
                    result=o.get("result"),
                    error=str(o.get("error") or ""),
                    category=str(o.get("category") or ""),
                    usage=o.get("usage"),
                )
                written += 1
            except NotFound:
                unknown += 1
    except (services.TinkerUserError, KeyError, TypeError, ValueError) as exc:
        return _error(400, _describe(exc))
    return JsonResponse({"written": written, "unknown": unknown})
