"""REST client for the OpenTinker API (``/api/v1``).

    from opentinker.client import Client

    with Client.from_env() as client:
        job = client.jobs.submit("job.yaml")
        job = client.jobs.wait(job.id, on_event=print)

Only GETs are retried (connection errors, 502/503/504): a retried POST could submit a job twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
import pydantic
import yaml

from opentinker import __version__
from opentinker.errors import (
    ApiConnectionError,
    AuthenticationError,
    OpenTinkerError,
    ValidationError,
    error_from_response,
)
from opentinker.registry_client import RegistryAPI
from opentinker.spec import JobKind, JobSpec, JobState
from opentinker.tinker_client import TinkerAPI
from opentinker.types import (
    Checkpoint,
    CreatedToken,
    EnvironmentPackage,
    EventPage,
    Job,
    JobEvent,
    Me,
    Member,
    MetricSeries,
    ModelPreset,
    Organization,
    Page,
    Quota,
    Rollouts,
    StreamEvent,
    Token,
)

API_PREFIX = "/api/v1"
USER_AGENT = f"opentinker-sdk/{__version__}"
ENV_URL = "OPENTINKER_URL"
ENV_TOKEN = "OPENTINKER_TOKEN"  # noqa: S105 - a variable name, not a secret
ENV_CONFIG = "OPENTINKER_CONFIG"
RETRY_STATUSES = frozenset({502, 503, 504})

M = TypeVar("M", bound=pydantic.BaseModel)
SpecSource = JobSpec | Mapping[str, Any] | str | os.PathLike[str]


# --- configuration ------------------------------------------------------------------------------------------


def config_path() -> Path:
    """``$OPENTINKER_CONFIG``, else ``~/.config/opentinker/config.json`` (written by ``opentinker login``)."""
    override = os.environ.get(ENV_CONFIG)
    return Path(override).expanduser() if override else Path.home() / ".config" / "opentinker" / "config.json"


def load_config(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The saved ``{"url", "token"}``; empty when there is no config file."""
    p = Path(path) if path is not None else config_path()
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise OpenTinkerError(f"cannot read config file {p}: {exc}", code="bad_config") from None
    if not isinstance(data, dict):
        raise OpenTinkerError(f"config file {p} must hold a JSON object", code="bad_config")
    return data


def resolve_credentials(path: str | os.PathLike[str] | None = None) -> tuple[str | None, str | None]:
    """(url, token): each from its environment variable if set, else from the config file."""
    config = load_config(path)
    url = os.environ.get(ENV_URL) or config.get("url")
    token = os.environ.get(ENV_TOKEN) or config.get("token")
    return url, token


def api_base_url(url: str) -> str:
    """Accept ``https://host`` or ``https://host/api/v1`` and return the latter."""
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValidationError(f"server URL must start with http:// or https:// (got {url!r})", code="bad_url")
    return url if url.endswith(API_PREFIX) else url + API_PREFIX


# --- job specs ----------------------------------------------------------------------------------------------


def load_spec(source: SpecSource) -> JobSpec:
    """Validate a job spec given as a JobSpec, a dict, or the path of a .yaml/.yml/.json file.

    Raises :class:`ValidationError` (with per-field messages) for invalid content and ``OSError`` when the
    file cannot be read.
    """
    if isinstance(source, JobSpec):
        return source
    if isinstance(source, str | os.PathLike):
        data: Any = _read_spec_file(Path(source))
    elif isinstance(source, Mapping):
        data = dict(source)
    else:
        raise TypeError(f"a job spec must be a JobSpec, a dict or a file path, not {type(source).__name__}")
    try:
        return JobSpec.model_validate(data)
    except pydantic.ValidationError as exc:
        raise ValidationError("invalid job spec", code="invalid", fields=pydantic_fields(exc)) from None


def _read_spec_file(path: Path) -> Any:
    text = path.read_text()
    try:
        # YAML is a superset of JSON, but json gives clearer errors for .json files.
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise ValidationError(f"{path} is not valid {path.suffix.lstrip('.') or 'YAML'}: {exc}") from None
    if not isinstance(data, dict):
        raise ValidationError(f"{path} must contain a mapping of job spec fields")
    return data


def pydantic_fields(exc: pydantic.ValidationError) -> dict[str, list[str]]:
    """Pydantic errors as the API's ``{"dotted.path": [messages]}``."""
    fields: dict[str, list[str]] = {}
    for err in exc.errors():
        path = ".".join(str(part) for part in err["loc"])
        fields.setdefault(path, []).append(err["msg"].removeprefix("Value error, "))
    return fields


# --- the client ---------------------------------------------------------------------------------------------


class Client:
    """A session with one OpenTinker server. Use as a context manager, or call :meth:`close`."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        max_retries: int = 2,
        backoff: float = 0.5,
    ) -> None:
        if not token:
            raise AuthenticationError("no API token given", code="not_authenticated")
        self.base_url = api_base_url(base_url)
        self.max_retries = max_retries
        self.backoff = backoff
        self._sleep: Callable[[float], None] = time.sleep
        self._http = httpx.Client(
            base_url=self.base_url,
            headers={
                "Authorization": f"Bearer {token}",
                "User-Agent": USER_AGENT,
                "Accept": "application/json",
            },
            timeout=timeout,
            transport=transport,
        )
        self.jobs = JobsAPI(self)
        self.tokens = TokensAPI(self)
        self.envs = EnvsAPI(self)
        self.registry = RegistryAPI(self)
        self.tinker = TinkerAPI(self)

    @classmethod
    def from_env(cls, *, config: str | os.PathLike[str] | None = None, **kwargs: Any) -> Client:
        """Credentials from ``OPENTINKER_URL``/``OPENTINKER_TOKEN``, falling back to the CLI's config file."""
        url, token = resolve_credentials(config)
        if not url or not token:
            raise OpenTinkerError(
                f"not logged in: run `opentinker login` or set {ENV_URL} and {ENV_TOKEN}",
                code="not_configured",
            )
        return cls(url, token, **kwargs)

    def __repr__(self) -> str:
        # Never the token.
        return f"Client({self.base_url!r})"

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- top-level resources --

    def me(self) -> Me:
        return self._get_model("/me", Me)

    def org(self) -> Organization:
        return self._get_model("/org", Organization)

    def quota(self) -> Quota:
        return self._get_model("/org/quota", Quota)

    def members(self, *, limit: int = 50, offset: int = 0) -> Page[Member]:
        return self._get_model("/org/members", Page[Member], params={"limit": limit, "offset": offset})

    def models(self) -> list[ModelPreset]:
        return self._get_results("/models", ModelPreset)

    # -- plumbing shared by the sub-APIs --

    def _get_model(self, path: str, model: type[M], params: Any = None) -> M:
        return _parse(model, self._call("GET", path, params=params))

    def _get_results(self, path: str, model: type[M], params: Any = None) -> list[M]:
        body = self._call("GET", path, params=params)
        return [_parse(model, item) for item in _list_field(body, "results")]

    def _call(
        self, method: str, path: str, *, params: Any = None, json: Any = None, headers: Any = None
    ) -> Any:
        """Send a request and return its decoded JSON body (None for 204)."""
        response = self._send(method, path, params=params, json=json, headers=headers, stream=False)
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise OpenTinkerError(
                f"the server did not answer with JSON (HTTP {response.status_code}, "
                f"{response.headers.get('content-type', 'no content type')}): is the URL right?",
                status=response.status_code,
                code="bad_response",
            ) from None

    @contextlib.contextmanager
    def _stream(self, path: str, headers: Any = None) -> Iterator[httpx.Response]:
        response = self._send("GET", path, headers=headers, stream=True)
        try:
            yield response
        finally:
            response.close()

    def _send(
        self,
        method: str,
        path: str,
        *,
        params: Any = None,
        json: Any = None,
        headers: Any = None,
        stream: bool,
    ) -> httpx.Response:
        # A POST carrying an Idempotency-Key is as safe to retry as a GET: the server answers a repeat
        # with the first result.
        retry_safe = method == "GET" or bool(headers and headers.get("Idempotency-Key"))
        attempts = 1 + (max(self.max_retries, 0) if retry_safe else 0)
        for attempt in range(attempts):
            last = attempt == attempts - 1
            request = self._http.build_request(method, path, params=params, json=json, headers=headers)
            try:
                # Redirects only for GET: httpx turns a redirected POST into a GET. httpx drops the
                # Authorization header when a redirect leaves the origin (e.g. to a presigned storage URL).
                response = self._http.send(request, stream=stream, follow_redirects=method == "GET")
            except httpx.TransportError as exc:
                if last:
                    raise self._connection_error(method, request, exc) from None
            else:
                if response.status_code not in RETRY_STATUSES or last:
                    return _raise_for_status(response, stream=stream)
                response.close()
            self._sleep(self.backoff * 2**attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def _checked(self, response: httpx.Response) -> httpx.Response:
        """The response, or the error its status means (for requests built by hand: uploads)."""
        return _raise_for_status(response, stream=False)

    def _connection_error(self, method: str, request: httpx.Request, exc: Exception) -> ApiConnectionError:
        detail = str(exc) or type(exc).__name__
        message = f"cannot reach {self.base_url} ({detail})"
        if method != "GET" and isinstance(exc, httpx.TimeoutException):
            # The server may have acted on it; retrying blindly could e.g. submit a job twice.
            message += f"; the {method} {request.url.path} may or may not have been applied"
        return ApiConnectionError(message, code="connection_error")


def _raise_for_status(response: httpx.Response, *, stream: bool) -> httpx.Response:
    if response.status_code < 300:
        return response
    if stream:
        response.read()
        response.close()
    if response.status_code < 400:
        location = response.headers.get("location", "?")
        raise OpenTinkerError(
            f"unexpected redirect to {location}: check the server URL (http vs https?)",
            status=response.status_code,
            code="redirect",
        )
    try:
        body = response.json()
    except ValueError:
        body = None
    raise error_from_response(response.status_code, body, reason=response.reason_phrase)


def _list_field(body: Any, key: str) -> list[Any]:
    value = body.get(key) if isinstance(body, dict) else None
    return value if isinstance(value, list) else []


def _parse(model: type[M], data: Any) -> M:
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        raise OpenTinkerError(
            f"unexpected response from the server for {model.__name__}",
            code="bad_response",
            fields=pydantic_fields(exc),
        ) from None


def _sse_events(lines: Iterator[str]) -> Iterator[StreamEvent]:
    """Parse a text/event-stream (the WHATWG format); ``retry:`` comes out as a ``retry`` event."""
    kind, event_id = "message", None
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield _stream_event(kind, event_id, "\n".join(data))
            kind, data, event_id = "message", [], None
            continue
        if line.startswith(":"):
            continue  # a comment: keep-alive
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            kind = value
        elif name == "data":
            data.append(value)
        elif name == "id":
            event_id = value
        elif name == "retry" and value.isdigit():
            yield StreamEvent(type="retry", data={"ms": int(value)})


def _stream_event(kind: str, event_id: str | None, raw: str) -> StreamEvent:
    try:
        data = json.loads(raw)
    except ValueError:
        data = {"text": raw}
    if not isinstance(data, dict):
        data = {"value": data}
    fields: dict[str, Any] = {"type": kind, "id": event_id, "data": data}
    if kind == "metrics":
        fields["points"] = data.get("points") or []
    elif kind in ("event", "state"):
        fields["event"] = data
        fields["state"] = data.get("state")
    elif kind == "log":
        fields["lines"] = data.get("lines") or []
    elif kind == "end":
        fields["state"] = data.get("state")
    return _parse(StreamEvent, fields)


class _CountedStream(httpx.SyncByteStream):
    """A request body that reports each chunk as it is sent (upload progress bars)."""

    def __init__(self, inner: Any, total: int, on_bytes: Callable[[int, int], object]) -> None:
        self.inner, self.total, self.on_bytes = inner, total, on_bytes

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.inner:
            yield chunk
            self.on_bytes(len(chunk), self.total)


def _seg(value: object) -> str:
    """One URL path segment: ids from users must not add path parts."""
    return quote(str(value), safe="")


def _enum_value(value: Any) -> Any:
    return value.value if isinstance(value, JobState | JobKind) else value


def _drop_none(params: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _enum_value(v) for k, v in params.items() if v is not None}


# --- sub-APIs -----------------------------------------------------------------------------------------------


class JobsAPI:
    def __init__(self, client: Client) -> None:
        self._c = client

    def submit(self, spec: SpecSource, *, validate: bool = True, idempotency_key: str | None = None) -> Job:
        """Submit a job. The spec is validated locally first; ``validate=False`` sends a dict as-is (for
        fields a newer server knows and this SDK does not).

        Every submission carries an Idempotency-Key (a fresh one unless given), so a submission lost to a
        network error is retried without ever creating a second job.
        """
        if not validate and isinstance(spec, Mapping):
            body: Any = dict(spec)
        else:
            body = load_spec(spec).model_dump(mode="json")
        key = idempotency_key or str(uuid.uuid4())
        return _parse(Job, self._c._call("POST", "/jobs", json=body, headers={"Idempotency-Key": key}))

    def get(self, job_id: str) -> Job:
        return self._c._get_model(f"/jobs/{_seg(job_id)}", Job)

    def cancel(self, job_id: str, reason: str = "") -> Job:
        return _parse(Job, self._c._call("POST", f"/jobs/{_seg(job_id)}/cancel", json={"reason": reason}))

    def metrics(
        self,
        job_id: str,
        names: list[str] | None = None,
        step_min: int | None = None,
        step_max: int | None = None,
        max_points: int | None = None,
    ) -> list[MetricSeries]:
        # A list of pairs, so that ``name`` may repeat.
        params: list[tuple[str, Any]] = [("name", n) for n in names or []]
        params += _drop_none({"step_min": step_min, "step_max": step_max, "max_points": max_points}).items()
        body = self._c._call("GET", f"/jobs/{_seg(job_id)}/metrics", params=params)
        return [_parse(MetricSeries, s) for s in _list_field(body, "series")]

    def events(self, job_id: str, after: int | None = None, limit: int = 100) -> EventPage:
        params = _drop_none({"after": after, "limit": limit})
        return self._c._get_model(f"/jobs/{_seg(job_id)}/events", EventPage, params=params)

    def iter_events(self, job_id: str, after: int | None = None, page_size: int = 100) -> Iterator[JobEvent]:
        """Every event recorded so far after ``after``; pass the last ``seq`` back to continue later."""
        while True:
            page = self.events(job_id, after=after, limit=page_size)
            yield from page.results
            if not page.results:
                return
            after = max(e.seq for e in page.results)
            # Relying on a short page as well as ``next_after``, which either means "more now" or "cursor".
            if page.next_after is None or len(page.results) < page_size:
                return

    def wait(
        self,
        job_id: str,
        *,
        poll_interval: float = 2.0,
        timeout: float | None = None,
        on_event: Callable[[JobEvent], object] | None = None,
    ) -> Job:
        """Poll until the job reaches a terminal state and return it; ``on_event`` sees each event once."""
        deadline = None if timeout is None else time.monotonic() + timeout
        after: int | None = None
        while True:
            if on_event is not None:
                for event in self.iter_events(job_id, after=after):
                    on_event(event)
                    after = event.seq
            job = self.get(job_id)
            if job.is_terminal:
                if on_event is not None:
                    for event in self.iter_events(job_id, after=after):
                        on_event(event)
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise OpenTinkerError(f"job {job_id} still {job.state} after {timeout:g}s", code="timeout")
            self._c._sleep(poll_interval)

    def watch(
        self, job_id: str, last_event_id: str | None = None, *, max_reconnects: int = 10
    ) -> Iterator[StreamEvent]:
        """Follow a job live (Server-Sent Events) until it finishes: first its history, then what happens.

        A lost connection is resumed where it stopped (``Last-Event-ID``), so no event is missed; pass an
        event's ``id`` as ``last_event_id`` to resume a watch later. The last event is of type ``end``.
        Gives up after ``max_reconnects`` failed reconnections in a row.
        """
        path = f"/jobs/{_seg(job_id)}/stream"
        failures = 0
        delay = self._c.backoff  # until the server says otherwise (SSE `retry:`)
        while True:
            headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
            if last_event_id:
                headers["Last-Event-ID"] = last_event_id
            try:
                with self._c._stream(path, headers=headers) as response:
                    for event in _sse_events(response.iter_lines()):
                        if event.type == "retry":
                            delay = float(event.data.get("ms", 0)) / 1000 or delay
                            continue
                        failures = 0
                        if event.id:
                            last_event_id = event.id
                        yield event
                        if event.type == "end":
                            return
            except (httpx.TransportError, ApiConnectionError) as exc:
                error: Exception = exc
            else:
                error = ApiConnectionError("the stream ended early")  # closed without `end`: resume
            failures += 1
            if failures > max_reconnects:
                raise ApiConnectionError(
                    f"lost the stream of job {job_id} {failures} times in a row ({error})",
                    code="connection_error",
                ) from None
            self._c._sleep(min(delay * 2 ** (failures - 1), 30.0))

    def checkpoints(self, job_id: str) -> list[Checkpoint]:
        return self._c._get_results(f"/jobs/{_seg(job_id)}/checkpoints", Checkpoint)

    def rollouts(self, job_id: str, step: int | None = None) -> Rollouts:
        """The episodes recorded at `step` (the latest recorded step when None), best and worst first."""
        return self._c._get_model(f"/jobs/{_seg(job_id)}/rollouts", Rollouts, _drop_none({"step": step}))

    def download(
        self,
        job_id: str,
        checkpoint_id: str,
        file_name: str,
        dest_path: str | os.PathLike[str],
        *,
        sha256: str | None = None,
        chunk_size: int = 1 << 20,
        on_bytes: Callable[[int], object] | None = None,
    ) -> Path:
        """Stream a checkpoint file to ``dest_path``. It appears there complete or not at all: bytes go to a
        temporary file next to it, renamed into place once done (and, if ``sha256`` is given, verified).
        ``on_bytes(n)`` is called after each chunk of ``n`` bytes is written (progress bars)."""
        dest = Path(dest_path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        # The file name may be a relative path inside the checkpoint, so keep its slashes.
        path = f"/jobs/{_seg(job_id)}/checkpoints/{_seg(checkpoint_id)}/files/{quote(file_name, safe='/')}"
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        try:
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as f, self._c._stream(path) as response:
                try:
                    for chunk in response.iter_bytes(chunk_size):
                        f.write(chunk)
                        digest.update(chunk)
                        if on_bytes is not None:
                            on_bytes(len(chunk))
                except httpx.TransportError as exc:
                    raise ApiConnectionError(f"download of {file_name} interrupted: {exc}") from None
                f.flush()
                os.fsync(f.fileno())
            if sha256 and digest.hexdigest() != sha256.lower():
                raise OpenTinkerError(
                    f"checksum mismatch for {file_name}: expected {sha256}, got {digest.hexdigest()}",
                    code="checksum_mismatch",
                )
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return dest

    # list/iter come last: a method named ``list`` shadows the builtin in annotations below it.

    def list(
        self,
        state: JobState | str | None = None,
        kind: JobKind | str | None = None,
        name: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> Page[Job]:
        params = _drop_none({"state": state, "kind": kind, "name": name, "limit": limit, "offset": offset})
        return self._c._get_model("/jobs", Page[Job], params=params)

    def iter(
        self,
        state: JobState | str | None = None,
        kind: JobKind | str | None = None,
        name: str | None = None,
        page_size: int = 100,
    ) -> Iterator[Job]:
        """Every matching job, fetching pages as needed."""
        offset = 0
        while True:
            page = self.list(state=state, kind=kind, name=name, limit=page_size, offset=offset)
            yield from page.results
            offset += len(page.results)
            # ``next`` is only a "there is more" signal: its absolute URL may name an internal host.
            if not page.results or page.next is None:
                return


class TokensAPI:
    def __init__(self, client: Client) -> None:
        self._c = client

    def create(self, name: str, scopes: list[str], expires_in_days: int | None = None) -> CreatedToken:
        body = {"name": name, "scopes": list(scopes), "expires_in_days": expires_in_days}
        return _parse(CreatedToken, self._c._call("POST", "/tokens", json=body))

    def list(self, limit: int = 50, offset: int = 0) -> Page[Token]:
        return self._c._get_model("/tokens", Page[Token], params={"limit": limit, "offset": offset})

    def get(self, token_id: str) -> Token:
        return self._c._get_model(f"/tokens/{_seg(token_id)}", Token)

    def revoke(self, token_id: str) -> None:
        self._c._call("DELETE", f"/tokens/{_seg(token_id)}")


class EnvsAPI:
    def __init__(self, client: Client) -> None:
        self._c = client

    def list(
        self,
        q: str | None = None,
        tag: str | None = None,
        limit: int = 50,
        offset: int = 0,
        sort: str | None = None,
    ) -> Page[EnvironmentPackage]:
        """Search; ``sort`` is ``stars``, ``usage``, ``recent`` or ``name`` (the default)."""
        params = _drop_none({"q": q, "tag": tag, "limit": limit, "offset": offset, "sort": sort})
        return self._c._get_model("/envs", Page[EnvironmentPackage], params=params)

    def get(self, owner: str, name: str) -> EnvironmentPackage:
        return self._c._get_model(f"/envs/{_seg(owner)}/{_seg(name)}", EnvironmentPackage)

    def push(
        self,
        directory: str | os.PathLike[str],
        *,
        visibility: str | None = None,
        on_bytes: Callable[[int, int], object] | None = None,
    ) -> EnvironmentPackage:
        """Pack ``directory`` (its ``opentinker.json`` or ``manifest.json``) and publish it as a new version.

        The server validates it in its sandbox; the returned package shows each version's ``status``.
        ``on_bytes(n, total)`` is called as each chunk of the upload's ``total`` bytes is sent.
        """
        data = pack_environment(directory)
        form = {"visibility": visibility} if visibility else None
        request = self._c._http.build_request(
            "POST", "/envs", files={"archive": ("package.tar.gz", data, "application/gzip")}, data=form
        )
        if on_bytes is not None:
            request.stream = _CountedStream(request.stream, int(request.headers["Content-Length"]), on_bytes)
        try:
            # Never retried: a retried upload of the same version would answer 409.
            response = self._c._http.send(request)
        except httpx.TransportError as exc:
            raise self._c._connection_error("POST", request, exc) from None
        return _parse(EnvironmentPackage, _raise_for_status(response, stream=False).json())

    def update(
        self,
        owner: str,
        name: str,
        *,
        description: str | None = None,
        visibility: str | None = None,
        tags: list[str] | None = None,
    ) -> EnvironmentPackage:
        body = _drop_none({"description": description, "visibility": visibility, "tags": tags})
        return _parse(
            EnvironmentPackage, self._c._call("PATCH", f"/envs/{_seg(owner)}/{_seg(name)}", json=body)
        )

    def star(self, owner: str, name: str) -> int:
        """Star it (idempotent); returns its star count."""
        return int(self._c._call("PUT", f"/envs/{_seg(owner)}/{_seg(name)}/star")["stars"])

    def unstar(self, owner: str, name: str) -> int:
        return int(self._c._call("DELETE", f"/envs/{_seg(owner)}/{_seg(name)}/star")["stars"])

    def fork(self, owner: str, name: str, new_name: str | None = None) -> EnvironmentPackage:
        """Copy its newest valid version into your organization as a private package."""
        body = _drop_none({"name": new_name})
        return _parse(
            EnvironmentPackage, self._c._call("POST", f"/envs/{_seg(owner)}/{_seg(name)}/fork", json=body)
        )


# --- environment packages -----------------------------------------------------------------------------------

MANIFEST_FILES = ("opentinker.json", "manifest.json")
MAX_PACKAGE_BYTES = 20 * 1024 * 1024
_SKIP_DIRS = frozenset(
    {"__pycache__", ".git", ".venv", "venv", "node_modules", ".mypy_cache", ".pytest_cache"}
)


def pack_environment(directory: str | os.PathLike[str]) -> bytes:
    """A deterministic ``.tar.gz`` of a package directory, with its manifest stored as ``opentinker.json``.

    Skips caches, VCS folders, hidden files and links (the server refuses links); refuses a directory
    without a manifest, or over the upload limit, before sending anything.
    """
    import gzip
    import io
    import tarfile

    root = Path(directory)
    if not root.is_dir():
        raise ValidationError(f"{root} is not a directory", code="invalid")
    manifest = next((root / m for m in MANIFEST_FILES if (root / m).is_file()), None)
    if manifest is None:
        raise ValidationError(f"{root} has no {' or '.join(MANIFEST_FILES)}", code="invalid")
    try:
        json.loads(manifest.read_text())
    except ValueError as exc:
        raise ValidationError(f"{manifest} is not valid JSON: {exc}", code="invalid") from None
    files: list[tuple[str, Path]] = [("opentinker.json", manifest)]
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part in _SKIP_DIRS or part.startswith(".") for part in rel.parts):
            continue
        if path.is_symlink() or not path.is_file() or path.suffix == ".pyc":
            continue
        if len(rel.parts) == 1 and rel.name in MANIFEST_FILES:
            continue
        files.append((rel.as_posix(), path))
    raw = io.BytesIO()
    # mtime 0 and fixed owners: the same directory packs to the same bytes (and sha256).
    with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for name, path in files:
            data = path.read_bytes()
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    data = raw.getvalue()
    if len(data) > MAX_PACKAGE_BYTES:
        raise ValidationError(
            f"the package is {len(data)} bytes packed; the limit is {MAX_PACKAGE_BYTES}", code="too_large"
        )
    return data
