"""Compare runs: pick several jobs of the organization, overlay their curves (aligned by step or by wall time,
smoothed), and read the keys of their specs that differ.

One GET form drives it (``/jobs/compare/?job=A&job=B&metric=reward/mean&align=step&smooth=0.6``), so a link
keeps the view; htmx swaps the results in place when the form changes. The curves are drawn by
frontend/src/compare.ts from the JSON the results carry.
"""

from __future__ import annotations

from typing import Any

from django.shortcuts import render

from portal.errors import DomainError
from portal.selectors.compare import (
    MAX_JOBS,
    compare_curves,
    compare_jobs,
    metric_names,
    spec_diff,
)
from portal.selectors.jobs import job_list
from portal.web.tenancy import org_page

PICKABLE = 50  # the newest jobs offered as checkboxes; older ones come by link (?job=...)
DEFAULT_METRICS = ("reward/mean", "loss", "kl")
MAX_METRICS = 6
ALIGNS = {"step": "Step", "time": "Wall time (s)"}
COLORS = ["#1d4ed8", "#b91c1c", "#047857", "#7c3aed", "#b45309", "#0e7490", "#be185d", "#4d7c0f"]


def _smooth(value: str | None) -> float:
    """The EMA weight, 0 (raw) to 0.95; anything else reads as 0."""
    try:
        s = float(value or 0)
    except ValueError:
        return 0.0
    return s if 0.0 <= s <= 0.95 else 0.0


def compare_context(organization, params) -> dict[str, Any]:
    error = ""
    try:
        jobs = compare_jobs(organization, params.getlist("job"))
    except DomainError as e:
        if e.status == 404:
            raise
        jobs, error = [], e.message
    names = metric_names(jobs)
    asked = [m for m in params.getlist("metric") if m in names][:MAX_METRICS]
    metrics = asked or [m for m in DEFAULT_METRICS if m in names] or names[:1]
    curves = compare_curves(jobs, metrics)
    align = params.get("align") if params.get("align") in ALIGNS else "step"
    smooth = _smooth(params.get("smooth"))
    series = [{"id": str(j.pk), "name": j.name, "color": COLORS[i % len(COLORS)]} for i, j in enumerate(jobs)]
    data = {
        "jobs": series,
        "metrics": metrics,
        "curves": {
            jid: {m: {"steps": c.steps, "seconds": c.seconds, "values": c.values} for m, c in per.items()}
            for jid, per in curves.items()
        },
    }
    last = [
        {
            "metric": m,
            "rows": [
                {
                    "job": j,
                    "color": series[i]["color"],
                    "step": c.steps[-1] if (c := curves[str(j.pk)].get(m)) else None,
                    "value": f"{c.values[-1]:.6g}" if c else None,
                    "points": len(c.steps) if c else 0,
                    "downsampled": c.downsampled if c else False,
                }
                for i, j in enumerate(jobs)
            ],
        }
        for m in metrics
    ]
    return {
        "jobs": jobs,
        "error": error,
        "names": names,
        "metrics": metrics,
        "align": align,
        "aligns": ALIGNS,
        "smooth": smooth,
        "data": data,
        "last": last,
        "diff": spec_diff(jobs),
        "series": series,
        "max_jobs": MAX_JOBS,
    }


@org_page
def job_compare(request):
    context = compare_context(request.organization, request.GET)
    if request.headers.get("HX-Request") == "true":
        return render(request, "portal/jobs/_compare.html", context)
    picked = {str(j.pk) for j in context["jobs"]}
    pickable = list(job_list(request.organization)[:PICKABLE])
    extra = [j for j in context["jobs"] if j not in pickable]  # linked jobs older than the newest 50
    context["pickable"] = [{"job": j, "checked": str(j.pk) in picked} for j in extra + pickable]
    return render(request, "portal/jobs/compare.html", context, status=400 if context["error"] else 200)
