"""`GET /api/v1/ingest/jobs/<id>/environment`: the job's pinned environment package archive, for its runtime.

Part of the ingest contract (api/views/ingest.py): the runtime authenticates with its job token and gets the
exact archive the job was pinned to at submission (`environment.ref` at a concrete version and
`environment.sha256` in the stored spec), as `application/gzip` with its sha256 in `X-Archive-SHA256`. The
runtime checks the bytes against the sha256 in its own spec, not against this header, so a wrong archive
from anywhere is refused. Another job's id is a 404, a user's credentials a 401.
"""

from __future__ import annotations

from django.http import FileResponse, HttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema

from api.serializers import ErrorSerializer
from api.views.ingest import IngestApi
from env_registry import storage
from env_registry.selectors import version_pinned
from opentinker.spec import EnvironmentSpec
from portal import storage as object_store
from portal.errors import NotFound

SHA_HEADER = "X-Checksum-Sha256"  # as the registry's own download (api/views/envs.py)


class IngestEnvironmentApi(IngestApi):
    @extend_schema(
        operation_id="ingest_environment",
        responses={
            (200, "application/gzip"): OpenApiResponse(
                OpenApiTypes.BINARY, description=f"The package archive (.tar.gz); its sha256 in {SHA_HEADER}."
            ),
            **{code: ErrorSerializer for code in (401, 404, 429)},
        },
        description="The job's pinned environment package archive (registry packages only; 404 for a "
        "built-in or remote environment).",
    )
    def get(self, request, job_id):
        job = self.job(request)
        raw = (job.spec or {}).get("environment")
        env = EnvironmentSpec.model_validate(raw) if raw else None
        ref = env.registry_ref if env else None
        if ref is None or not env.sha256:
            raise NotFound("this job's environment has no package archive (built-in or remote)")
        version = version_pinned(owner=ref.owner, name=ref.name, version=ref.version, sha256=env.sha256)
        filename = f"{ref.name}-{ref.version}.tar.gz"
        if version.archive_uri.startswith("s3://"):
            # Proxied, not redirected to a signed URL: a pool on another network may not reach the bucket.
            response = HttpResponse(storage.archive_get(version.archive_uri), content_type="application/gzip")
            response["Content-Disposition"] = f'attachment; filename="{filename}"'
        else:
            path = object_store.local_path(version.archive_uri)
            response = FileResponse(path.open("rb"), as_attachment=True, filename=filename)
        response[SHA_HEADER] = version.sha256
        return response
