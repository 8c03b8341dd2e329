"""Jobs: the list with filters, the new-job form (a JobSpec validated by opentinker.spec and submitted
through the same service as the API), the job page (status, live curves, config, events, logs,
checkpoints), cancel and resume."""

from __future__ import annotations

import json
import uuid

import pydantic
from django import forms
from django.contrib import messages
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_http_methods, require_POST

from env_registry.model_promote import model_promote
from env_registry.models import EnvironmentVersion
from env_registry.selectors import package_visible_list, version_list
from env_registry.visibility import Viewer
from opentinker.spec import (
    KIND_ALGORITHMS,
    MODEL_PRESETS,
    TERMINAL_STATES,
    JobKind,
    JobSpec,
    JobState,
    example_rl_spec,
)
from portal.actors import Actor
from portal.errors import DomainError
from portal.models import Allocation, JobLog, Scope
from portal.selectors.jobs import checkpoint_list, event_list, job_get, job_list
from portal.selectors.queue import queue_position
from portal.services.job_resume import RESUMABLE, job_resume
from portal.services.jobs import MAX_IDEMPOTENCY_KEY, job_cancel, job_submit
from portal.web.forms import add_domain_error
from portal.web.rollouts import rollouts_context
from portal.web.tenancy import org_page, page_scopes, require_scope

PAGE = 50
LOG_TAIL = 200
MAX_ENV_CHOICES = 300
_TERMINAL = {s.value for s in TERMINAL_STATES}
_ALGORITHMS = sorted({a for algos in KIND_ALGORITHMS.values() for a in algos})


# -- list --


class JobFilterForm(forms.Form):
    state = forms.ChoiceField(
        choices=[("", "Any state"), *((s.value, s.value) for s in JobState)], required=False
    )
    kind = forms.ChoiceField(
        choices=[("", "Any kind"), *((k.value, k.value) for k in JobKind)], required=False
    )
    name = forms.CharField(max_length=100, required=False, label="Name contains")


@org_page
def job_index(request):
    f = JobFilterForm(request.GET or None)
    jobs = job_list(request.organization)
    if f.is_valid():
        d = f.cleaned_data
        jobs = job_list(
            request.organization,
            state=[d["state"]] if d["state"] else None,
            kind=d["kind"] or None,
            name=d["name"].strip() or None,
        )
    try:
        page = max(1, int(request.GET.get("page", "1")))
    except ValueError:
        page = 1
    total = jobs.count()
    rows = list(jobs[(page - 1) * PAGE : page * PAGE])
    query = request.GET.copy()
    query.pop("page", None)
    return render(
        request,
        "portal/jobs/index.html",
        {
            "filters": f,
            "jobs": rows,
            "total": total,
            "caption": f"{total} job{'' if total == 1 else 's'}",
            "page": page,
            "has_next": page * PAGE < total,
            "query": query.urlencode(),
            "can_submit": Scope.JOBS_WRITE in page_scopes(request),
        },
    )


# -- new job --

# Form field -> place in the JobSpec. Errors from the spec's validation (pydantic `loc`) and from the
# submission service (DomainError.field) come back through the same map, so each shows next to its input.
SPEC_FIELDS = {
    "kind": "kind",
    "name": "name",
    "model_base": "model.base",
    "environment_ref": "environment.ref",
    "dataset_uri": "dataset.uri",
    "algorithm_name": "algorithm.name",
    "algorithm_steps": "algorithm.steps",
    "algorithm_batch_size": "algorithm.batch_size",
    "algorithm_group_size": "algorithm.group_size",
    "algorithm_learning_rate": "algorithm.learning_rate",
    "algorithm_max_new_tokens": "algorithm.max_new_tokens",
    "algorithm_kl_coef": "algorithm.kl_coef",
    "resources_gpus": "resources.gpus",
    "resources_cpus": "resources.cpus",
    "resources_memory_gb": "resources.memory_gb",
    "resources_max_hours": "resources.max_hours",
    "resources_pool": "resources.pool",
    "checkpoint_every_steps": "checkpoint.every_steps",
    "checkpoint_keep_last": "checkpoint.keep_last",
    "seed": "seed",
    "priority": "priority",
}
# Cross-field rules of the spec name the section (`environment`, `algorithm`): shown at its main input.
FORM_FIELD_OF = {v: k for k, v in SPEC_FIELDS.items()} | {
    "environment": "environment_ref",
    "dataset": "dataset_uri",
    "algorithm": "algorithm_name",
    "model": "model_base",
}


def _int(label: str, help_text: str = "") -> forms.IntegerField:
    # No bounds here: the JobSpec owns them, so the form and the API give the same answer.
    return forms.IntegerField(label=label, required=False, help_text=help_text)


def _float(label: str, help_text: str = "") -> forms.FloatField:
    return forms.FloatField(label=label, required=False, help_text=help_text)


class JobForm(forms.Form):
    kind = forms.ChoiceField(choices=[(k.value, k.value) for k in JobKind])
    name = forms.CharField(max_length=100, required=False, help_text="A label for humans.")
    model_base = forms.CharField(
        label="Model",
        max_length=512,
        widget=forms.TextInput(attrs={"list": "model-presets"}),
        help_text="A preset ("
        + ", ".join(sorted(MODEL_PRESETS))
        + ") or an s3:// / file:// URI in your organization's storage.",
    )
    environment_ref = forms.CharField(
        label="Environment",
        max_length=300,
        widget=forms.TextInput(attrs={"list": "environments"}),
        required=False,
        help_text="Pick from the marketplace (owner/name@version) or type a remote environment URL.",
    )
    dataset_uri = forms.CharField(
        label="Dataset URI", max_length=1024, required=False, help_text="Chat JSONL, for SFT jobs."
    )
    algorithm_name = forms.ChoiceField(label="Algorithm", choices=[(a, a) for a in _ALGORITHMS])
    algorithm_steps = _int("Steps")
    algorithm_batch_size = _int("Batch size", "Prompts per step.")
    algorithm_group_size = _int("Group size", "Samples per prompt.")
    algorithm_learning_rate = _float("Learning rate")
    algorithm_max_new_tokens = _int("Max new tokens")
    algorithm_kl_coef = _float("KL coefficient")
    resources_gpus = _int("GPUs", "0 runs on CPU slots.")
    resources_cpus = _int("CPUs")
    resources_memory_gb = _float("Memory (GB)")
    resources_max_hours = _float("Max hours")
    resources_pool = forms.CharField(
        label="Pool", max_length=64, required=False, help_text="Empty: any pool."
    )
    checkpoint_every_steps = _int("Checkpoint every (steps)")
    checkpoint_keep_last = _int("Keep last checkpoints")
    seed = _int("Seed")
    priority = _int("Priority", "-10 to 10, within your organization's queue.")
    idempotency_key = forms.CharField(
        widget=forms.HiddenInput, max_length=MAX_IDEMPOTENCY_KEY, required=False
    )

    def spec_data(self) -> dict:
        """The JobSpec as JSON data: empty optional fields are left out so the spec's defaults apply."""
        data: dict = {}
        for form_field, path in SPEC_FIELDS.items():
            value = self.cleaned_data.get(form_field)
            if value is None or value == "":
                continue
            head, _, leaf = path.partition(".")
            if leaf:
                data.setdefault(head, {})[leaf] = value.strip() if isinstance(value, str) else value
            else:
                data[head] = value.strip() if isinstance(value, str) else value
        return data

    def add_spec_errors(self, error: pydantic.ValidationError) -> None:
        for e in error.errors():
            loc = ".".join(str(p) for p in e["loc"])
            field = FORM_FIELD_OF.get(loc)
            message = e["msg"].removeprefix("Value error, ")
            self.add_error(field if field in self.fields else None, message if field else f"{loc}: {message}")


def _initial() -> dict:
    s = example_rl_spec()
    initial = {"idempotency_key": uuid.uuid4().hex}
    dumped = s.model_dump(mode="json")
    for form_field, path in SPEC_FIELDS.items():
        head, _, leaf = path.partition(".")
        value = dumped.get(head)
        value = value.get(leaf) if leaf and isinstance(value, dict) else (None if leaf else value)
        if value is not None:
            initial[form_field] = value
    return initial


def _environment_choices(membership) -> list[str]:
    refs = []
    for package in package_visible_list(Viewer.of(membership))[:MAX_ENV_CHOICES]:
        for v in version_list(package):
            if v.status == EnvironmentVersion.Status.VALID:
                refs.append(f"{package.organization.slug}/{package.name}@{v.version}")
    return refs


@org_page
@require_http_methods(["GET", "POST"])
def job_new(request):
    require_scope(request, Scope.JOBS_WRITE, "submit jobs")
    form = JobForm(request.POST or None, initial=_initial())
    if request.method == "POST" and form.is_valid():
        try:
            spec = JobSpec.model_validate_json(json.dumps(form.spec_data()), strict=True)
        except pydantic.ValidationError as e:
            form.add_spec_errors(e)
        else:
            try:
                job, _ = job_submit(
                    organization=request.organization,
                    actor=Actor.for_request(request.user),
                    spec=spec,
                    idempotency_key=form.cleaned_data["idempotency_key"],
                )
            except DomainError as e:
                add_domain_error(form, e, fields=FORM_FIELD_OF)
            else:
                messages.success(request, f"Submitted {job.name}: it is {job.state}.")
                return redirect("job_detail", job_id=job.pk)
    context = {
        "form": form,
        "environments": _environment_choices(request.membership),
        "presets": MODEL_PRESETS,
    }
    return render(request, "portal/jobs/new.html", context, status=400 if form.errors else 200)


# -- one job --


def _duration(job) -> str:
    if not job.started_at:
        return ""
    seconds = int(((job.finished_at or timezone.now()) - job.started_at).total_seconds())
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"


def _queue_status(job) -> dict | None:
    """Where a queued job stands in the scheduler's order, and why it waits (the admin queue's reasoning,
    limited to this job: another organization's jobs appear only as a count ahead)."""
    if job.state != JobState.QUEUED.value:
        return None
    return queue_position(job.pk) or {
        "position": None,
        "of": None,
        "reason": "waiting for the next scheduler pass",
        "category": "",
    }


def _status_context(request, job) -> dict:
    allocation = Allocation.objects.filter(job=job).select_related("pool").order_by("-admitted_at").first()
    checkpoints = list(checkpoint_list(job))
    can_write = Scope.JOBS_WRITE in page_scopes(request)
    return {
        "job": job,
        "allocation": allocation,
        "duration": _duration(job),
        "queue": _queue_status(job),
        "checkpoints": checkpoints,
        "can_cancel": can_write and job.state not in _TERMINAL and job.state != JobState.CANCELLING.value,
        "can_resume": can_write and job.state in RESUMABLE and bool(checkpoints),
        "can_promote": Scope.ENVS_WRITE in page_scopes(request) and bool(checkpoints),
        "finished": job.state in _TERMINAL,
    }


@org_page
def job_detail(request, job_id):
    job = job_get(request.organization, job_id)
    logs = list(JobLog.objects.filter(job=job).order_by("-seq")[:LOG_TAIL])[::-1]
    context = _status_context(request, job) | {
        "events": event_list(job, limit=500),
        "logs": logs,
        "last_log_seq": logs[-1].seq if logs else 0,
        "config": json.dumps(job.spec, indent=2, sort_keys=True),
        "metrics_url": f"/api/v1/jobs/{job.pk}/metrics?max_points=2000",
        "stream_url": f"/api/v1/jobs/{job.pk}/stream",
        **rollouts_context(job, request.GET),
    }
    return render(request, "portal/jobs/detail.html", context)


@org_page
def job_status(request, job_id):
    """The status header, checkpoints and actions, refreshed by htmx while the job runs."""
    job = job_get(request.organization, job_id)
    return render(request, "portal/jobs/_status.html", _status_context(request, job))


@org_page
@require_POST
def job_cancel_view(request, job_id):
    job = job_get(request.organization, job_id)  # another organization's job: 404 before any role check
    require_scope(request, Scope.JOBS_WRITE, "cancel jobs")
    reason = request.POST.get("reason", "")[:500]
    try:
        job = job_cancel(job=job, actor=Actor.for_request(request.user), reason=reason)
    except DomainError as e:
        messages.error(request, e.message)
    else:
        messages.success(request, f"{job.name} is {job.state}.")
    return redirect("job_detail", job_id=job.pk)


@org_page
@require_POST
def job_resume_view(request, job_id):
    job = job_get(request.organization, job_id)
    require_scope(request, Scope.JOBS_WRITE, "resume jobs")
    try:
        new_job = job_resume(job=job, actor=Actor.for_request(request.user))
    except DomainError as e:
        messages.error(request, e.message)
        return redirect("job_detail", job_id=job.pk)
    messages.success(request, f"Submitted {new_job.name}, resuming from the last checkpoint of {job.name}.")
    return redirect(reverse("job_detail", kwargs={"job_id": new_job.pk}))


@org_page
@require_POST
def job_promote_view(request, job_id):
    """Copy one of the job's checkpoints into the organization's model registry (as the API does)."""
    job = job_get(request.organization, job_id)
    require_scope(request, Scope.ENVS_WRITE, "promote checkpoints into the model registry")
    raw_step = request.POST.get("step", "").strip()
    try:
        step = int(raw_step) if raw_step else None  # none given: the latest
    except ValueError:  # never another checkpoint than the one asked for
        messages.error(request, f"step {raw_step[:20]!r} is not a checkpoint's step number")
        return redirect("job_detail", job_id=job.pk)
    try:
        version = model_promote(
            organization=request.organization,
            user=request.user,
            job=job,
            step=step,
            name=request.POST.get("name", "").strip(),
        )
    except DomainError as e:
        messages.error(request, e.message)
        return redirect("job_detail", job_id=job.pk)
    ref = f"{request.organization.slug}/{version.model.name}@{version.version}"
    messages.success(request, f"Promoted the checkpoint as {ref} ({version.status}).")
    return redirect("job_detail", job_id=job.pk)
