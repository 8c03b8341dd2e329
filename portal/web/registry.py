"""The organization's own models and datasets (read-only pages; uploads go through the API and
`opentinker models push` / `datasets push`): each with its versions, validation and, for datasets, a preview
(columns, row count, first rows). Reads go through env_registry's registry modules with the current
organization, so another organization's model or dataset is a 404 here as in the API."""

from __future__ import annotations

from django.shortcuts import render

from env_registry import dataset_registry, model_registry
from portal.web.tenancy import org_page


@org_page
def registry_index(request):
    org = request.organization
    context = {
        "models": model_registry.model_list(org),
        "datasets": dataset_registry.dataset_list(org),
        "owner": org.slug,
    }
    return render(request, "portal/registry/index.html", context)


@org_page
def model_detail(request, name: str):
    model = model_registry.model_get(request.organization, name)
    versions = list(model.versions.all())
    return render(request, "portal/registry/model.html", {"model": model, "versions": versions})


@org_page
def dataset_detail(request, name: str):
    dataset = dataset_registry.dataset_get(request.organization, name)
    versions = list(dataset.versions.all())
    latest = versions[0] if versions else None
    rows = []
    if latest is not None:
        names = [c["name"] for c in latest.columns]
        rows = [[row.get(n, "") for n in names] for row in latest.preview]
    context = {"dataset": dataset, "versions": versions, "latest": latest, "rows": rows}
    return render(request, "portal/registry/dataset.html", context)
