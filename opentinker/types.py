"""Typed views of the API's responses.

Every model ignores unknown fields and gives defaults to anything non-essential, so an older SDK keeps
working against a newer server that adds fields. Enum-valued fields fall back to the raw string for values
this SDK does not know yet (e.g. a new job state).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from opentinker.spec import TERMINAL_STATES, JobKind, JobState

T = TypeVar("T")

# Try the enum first, keep the string if it is unknown (smart-mode unions would always pick the plain str).
StateField = Annotated[JobState | str, Field(union_mode="left_to_right")]
KindField = Annotated[JobKind | str, Field(union_mode="left_to_right")]


class ApiModel(BaseModel):
    # Ids may be integers or UUID strings depending on the resource; always expose them as str.
    model_config = ConfigDict(extra="ignore", coerce_numbers_to_str=True)


class Page(ApiModel, Generic[T]):
    """One page of a list endpoint; ``count`` is the total over all pages."""

    count: int = 0
    next: str | None = None
    previous: str | None = None
    results: list[T] = Field(default_factory=list)


class Job(ApiModel):
    id: str
    name: str = ""
    kind: KindField
    state: StateField
    state_reason: str | None = ""
    spec: dict[str, Any] = Field(default_factory=dict)
    organization: str | None = None
    created_by: str | None = None
    priority: int = 0
    gpus: int = 0
    pool: str | None = None
    attempt: int = 0
    created_at: datetime | None = None
    updated_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @property
    def is_terminal(self) -> bool:
        return self.state in TERMINAL_STATES


class JobEvent(ApiModel):
    seq: int
    kind: str
    created_at: datetime | None = None
    actor: str | None = None
    from_state: str | None = None
    to_state: str | None = None
    message: str | None = ""
    data: dict[str, Any] | None = Field(default_factory=dict)


class EventPage(ApiModel):
    """Events after a sequence number; pass ``next_after`` back as ``after`` (None: no more events yet)."""

    results: list[JobEvent] = Field(default_factory=list)
    next_after: int | None = None


class MetricPoint(ApiModel):
    step: int
    name: str
    value: float | None = None


class LogLine(ApiModel):
    seq: int
    stream: str = "stdout"
    line: str = ""
    created_at: datetime | None = None


class StreamEvent(ApiModel):
    """One event of a job's live stream (``client.jobs.watch``).

    ``type`` is ``metrics`` (``points``), ``event`` or ``state`` (``event``; ``state`` is the new state),
    ``log`` (``lines``), ``sync`` (history sent, live from here) or ``end`` (``state`` is the final state; the
    stream is over). Newer servers may send other types; ``data`` always holds the raw payload.
    """

    type: str
    id: str | None = None
    points: list[MetricPoint] = Field(default_factory=list)
    event: JobEvent | None = None
    lines: list[LogLine] = Field(default_factory=list)
    state: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)


class MetricSeries(ApiModel):
    name: str
    steps: list[int] = Field(default_factory=list)
    # None stands for a non-finite value (JSON has no NaN); servers may also send NaN itself.
    values: list[float | None] = Field(default_factory=list)
    downsampled: bool = False

    def points(self) -> list[tuple[int, float | None]]:
        return list(zip(self.steps, self.values, strict=False))


class CheckpointFile(ApiModel):
    name: str
    size: int | None = None
    sha256: str | None = None
    download_url: str | None = None


class Checkpoint(ApiModel):
    id: str
    step: int | None = None
    uri: str | None = None
    created_at: datetime | None = None
    size_bytes: int | None = None
    files: list[CheckpointFile] = Field(default_factory=list)

    def file(self, name: str) -> CheckpointFile | None:
        return next((f for f in self.files if f.name == name), None)


class Token(ApiModel):
    id: str
    name: str = ""
    lookup: str = ""
    scopes: list[str] = Field(default_factory=list)
    user: str | None = None
    created_at: datetime | None = None
    expires_at: datetime | None = None
    last_used_at: datetime | None = None
    revoked_at: datetime | None = None

    @property
    def is_revoked(self) -> bool:
        return self.revoked_at is not None


class CreatedToken(Token):
    """Returned once, by ``tokens.create``: ``token`` is the secret and cannot be fetched again."""

    # Kept out of repr so that logging the object does not leak the secret.
    token: str = Field(repr=False)


class OrganizationRef(ApiModel):
    slug: str
    name: str = ""


class Me(ApiModel):
    username: str
    email: str | None = ""
    is_staff: bool = False
    organization: OrganizationRef | None = None
    role: str | None = None
    scopes: list[str] = Field(default_factory=list)


class Organization(ApiModel):
    slug: str
    name: str = ""
    role: str | None = None
    created_at: datetime | None = None


class Quota(ApiModel):
    max_gpus: int | None = None
    borrowing_limit_gpus: int | None = None
    gpu_hours_per_month: float | None = None
    max_queued_jobs: int | None = None
    fair_share_weight: float | None = None
    allowed_pools: list[str] = Field(default_factory=list)
    updated_at: datetime | None = None


class Member(ApiModel):
    id: str
    username: str
    email: str | None = ""
    role: str | None = None
    joined_at: datetime | None = None


class Invitation(ApiModel):
    # No invitation endpoint is in the REST contract yet; kept lenient so it fits whatever lands.
    id: str
    email: str = ""
    role: str | None = None
    invited_by: str | None = None
    created_at: datetime | None = None
    expires_at: datetime | None = None
    accepted_at: datetime | None = None


class EnvironmentPackage(ApiModel):
    owner: str
    name: str
    description: str | None = ""
    visibility: str | None = None
    tags: list[str] = Field(default_factory=list)
    latest_version: str | None = None
    # Version strings (lists) or version objects (detail): the contract leaves the element shape open.
    versions: list[Any] = Field(default_factory=list)
    stars: int = 0
    usage_count: int = 0
    # Detail only.
    readme: str | None = None
    starred: bool | None = None
    forked_from: str | None = None

    def version_info(self, version: str | None = None) -> dict[str, Any] | None:
        """The detail's entry for ``version`` (default: the newest), with its status and validation error."""
        objects = [v for v in self.versions if isinstance(v, dict)]
        if version is None:
            return objects[0] if objects else None
        return next((v for v in objects if v.get("version") == version), None)

    @property
    def ref(self) -> str:
        """The ``owner/name@version`` to put in a job spec."""
        return f"{self.owner}/{self.name}@{self.latest_version or 'latest'}"


class ModelPreset(ApiModel):
    name: str
    family: str | None = None
    params: str | None = None
    description: str | None = ""


class RolloutTurn(ApiModel):
    """One turn of a recorded episode: what the policy generated, what the environment made of it."""

    text: str = ""
    action: str = ""
    tool_calls: list[dict[str, Any]] = Field(default_factory=list)
    reward: float = 0.0
    truncated: bool = False
    observation: str = ""
    info: dict[str, Any] = Field(default_factory=dict)
    tokens: dict[str, int] = Field(default_factory=dict)  # generated (trained), observation (not trained)


class RolloutEpisode(ApiModel):
    index: int = 0
    group: int = 0
    game: int | None = None  # multi-agent: the game; its roles share it
    role: str = "agent"
    reward: float = 0.0
    final_reward: float = 0.0
    stop_reason: str = ""
    prompt: str = ""
    turns: list[RolloutTurn] = Field(default_factory=list)
    tokens: dict[str, int] = Field(default_factory=dict)  # prompt, generated, untrained, total


class Rollouts(ApiModel):
    """A step's recorded episodes (best and worst first) and every step stored."""

    step: int
    steps: list[int] = Field(default_factory=list)
    episodes: list[RolloutEpisode] = Field(default_factory=list)
