"""An organization's datasets: one JSONL or Parquet file, or a directory saved by Hugging Face `datasets`
(`Dataset.save_to_disk`: dataset_info.json, state.json, data-*.arrow), uploaded with the resumable protocol
(env_registry/uploads.py), read with pyarrow (never executed: no loading scripts) for the preview, and stored
as numbered versions at `<org prefix>/datasets/<name>/<version>`. Jobs name them as `dataset.ref`
(`owner/name@2`), resolved at submission to that version's directory; the runtime loads it with `datasets`.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from django.db import transaction
from django.db.models import Max

from env_registry import uploads
from env_registry.model_files import PATH_RE, DeclaredFile
from env_registry.models import DatasetVersion, RegisteredDataset, Upload
from env_registry.registry_uris import registry_location
from opentinker.spec import ModelRef
from portal import storage
from portal.errors import DomainError, NotFound
from portal.models import Organization
from portal.services.model_refs import ResolvedModel

PREVIEW_ROWS = 5
PREVIEW_VALUE_CHARS = 300
# The preview reads at most this much of a JSONL file (its first rows), never the whole file.
PREVIEW_MAX_BYTES = 8 * 1024 * 1024
HF_FILES = ("dataset_info.json", "state.json")
ARROW_RE = re.compile(r"^data-\d{5}-of-\d{5}\.arrow$")
MAX_STATE_JSON_BYTES = 1024 * 1024


class DatasetFilesError(ValueError):
    pass


def dataset_format(files: list[DeclaredFile]) -> str:
    """jsonl, parquet or hf, from the file list; anything else is refused with the reason."""
    paths = [f.path for f in files]
    for p in paths:
        if not PATH_RE.match(p) or "/" in p:
            raise DatasetFilesError(
                f"{p!r}: a dataset's files are plain names (letters, digits, '.', '_', '-')"
            )
    if len(paths) == 1 and paths[0].endswith((".jsonl", ".parquet")):
        return "jsonl" if paths[0].endswith(".jsonl") else "parquet"
    names = set(paths)
    arrows = [p for p in paths if ARROW_RE.match(p)]
    if set(HF_FILES) <= names and arrows and names == set(HF_FILES) | set(arrows):
        return "hf"
    raise DatasetFilesError(
        "a dataset is one .jsonl or .parquet file, or a directory saved by datasets' save_to_disk "
        "(dataset_info.json, state.json and data-NNNNN-of-NNNNN.arrow files, nothing else)"
    )


def _cut(value: Any) -> Any:
    text = json.dumps(value, default=str)
    return value if len(text) <= PREVIEW_VALUE_CHARS else text[:PREVIEW_VALUE_CHARS] + "…"


def _check_state_json(root: Path) -> None:
    """state.json's `_data_files` must name exactly the uploaded arrow files: `datasets.load_from_disk` joins
    those names onto the directory, so `../other-org/...` or an absolute path would read another
    organization's data (the runtime loads the arrow files itself too, never trusting this file)."""
    arrows = sorted(p.name for p in root.iterdir() if ARROW_RE.match(p.name))
    state_path = root / "state.json"
    if state_path.stat().st_size > MAX_STATE_JSON_BYTES:
        raise DatasetFilesError(f"state.json is over {MAX_STATE_JSON_BYTES} bytes")
    try:
        state = json.loads(state_path.read_bytes())
    except (ValueError, UnicodeDecodeError):
        raise DatasetFilesError("state.json is not JSON") from None
    files = state.get("_data_files") if isinstance(state, dict) else None
    named = (
        [f.get("filename") if isinstance(f, dict) else f for f in files] if isinstance(files, list) else None
    )
    if arrows != [f"data-{i:05d}-of-{len(arrows):05d}.arrow" for i in range(len(arrows))]:
        raise DatasetFilesError(f"the arrow files are not one complete set: {', '.join(arrows)}")
    if named != arrows:
        raise DatasetFilesError(
            f"state.json's _data_files must name exactly the uploaded arrow files {arrows}, in order; "
            f"it names {named!r}"[:500]
        )


def _jsonl_rows(path: Path) -> int:
    """Non-blank lines, counted in blocks (memory stays one block whatever the file or a line's size)."""
    rows, filled = 0, False
    with path.open("rb") as f:
        while block := f.read(1024 * 1024):
            lines = block.split(b"\n")
            for n, line in enumerate(lines):
                filled = filled or bool(line.strip())
                if n < len(lines) - 1:  # a newline ends this line
                    rows += filled
                    filled = False
    return rows + filled


def _jsonl_head(path: Path) -> bytes:
    """The first PREVIEW_ROWS non-blank lines, read line by line up to PREVIEW_MAX_BYTES."""
    head: list[bytes] = []
    with path.open("rb") as f:
        while len(head) < PREVIEW_ROWS:
            line = f.readline(PREVIEW_MAX_BYTES + 1)
            if not line:
                break
            if len(line) > PREVIEW_MAX_BYTES or sum(map(len, head)) + len(line) > PREVIEW_MAX_BYTES:
                if head:
                    break
                raise DatasetFilesError(f"the first row is over {PREVIEW_MAX_BYTES} bytes")
            if line.strip():
                head.append(line if line.endswith(b"\n") else line + b"\n")
    return b"".join(head)


def dataset_inspect(root: Path, fmt: str) -> dict[str, Any]:
    """Columns, row count and the first rows, read with pyarrow without loading the data: Parquet's count
    from its metadata and the first batch only, JSONL's first lines and a streamed line count, the arrow
    files memory-mapped batch by batch. An unreadable file is refused."""
    import pyarrow as pa  # lazy: only this path needs it
    import pyarrow.json as pa_json
    import pyarrow.parquet as pq

    table: Any = None
    try:
        if fmt == "parquet":
            pf = pq.ParquetFile(next(root.glob("*.parquet")))
            schema, num_rows = pf.schema_arrow, pf.metadata.num_rows
            if num_rows:
                table = next(pf.iter_batches(batch_size=PREVIEW_ROWS))
        elif fmt == "jsonl":
            path = next(root.glob("*.jsonl"))
            table = pa_json.read_json(pa.BufferReader(_jsonl_head(path)))
            schema, num_rows = table.schema, _jsonl_rows(path) if table.num_rows else 0
        else:
            _check_state_json(root)
            head: list[dict[str, Any]] = []
            schema, num_rows = None, 0
            for f in sorted(root.glob("data-*.arrow")):
                with pa.memory_map(str(f)) as src:  # batches are views of the map: copied out inside
                    reader = pa.ipc.open_stream(src)
                    if schema is not None and not reader.schema.equals(schema):
                        raise DatasetFilesError(f"{f.name} has other columns than the first arrow file")
                    schema = reader.schema
                    for batch in reader:
                        num_rows += batch.num_rows
                        head += batch.slice(0, PREVIEW_ROWS - len(head)).to_pylist()
            table = pa.Table.from_pylist(head, schema=schema) if head else None
    except (pa.ArrowException, OSError, StopIteration, ValueError) as e:
        if isinstance(e, DatasetFilesError):
            raise
        raise DatasetFilesError(f"the {fmt} data cannot be read: {e}") from None
    if num_rows == 0:
        raise DatasetFilesError("the dataset has no rows")
    rows = table.slice(0, PREVIEW_ROWS).to_pylist() if table is not None else []
    return {
        "num_rows": int(num_rows),
        "columns": [{"name": f.name, "type": str(f.type)} for f in schema],
        "preview": [{k: _cut(v) for k, v in row.items()} for row in rows],
    }


def dataset_upload_start(
    *, organization: Organization, user, name: str, files: list[DeclaredFile], description=""
):
    try:
        dataset_format(files)
    except DatasetFilesError as e:
        raise DomainError(str(e), field="files") from None
    return uploads.upload_start(
        organization=organization,
        user=user,
        kind=Upload.Kind.DATASET,
        name=name,
        files=files,
        description=description,
    )


def dataset_upload_complete(upload: Upload) -> DatasetVersion:
    """Check the uploaded files and store them as the next version; a refusal deletes the upload and leaves
    nothing stored. One completion of an upload runs at a time (uploads.upload_completing)."""
    with uploads.upload_completing(upload):
        fresh = Upload.objects.select_related("organization", "user").get(pk=upload.pk)
        return _dataset_upload_complete(fresh)


def _dataset_upload_complete(upload: Upload) -> DatasetVersion:
    """Read the uploaded data and store it as the dataset's next version; a refusal deletes the upload."""
    uploads.upload_check_arrived(upload)
    files = [DeclaredFile(f["path"], f["size"], f["sha256"]) for f in upload.files]
    root: Path | None = None
    try:
        fmt = dataset_format(files)
        root = uploads.upload_assemble(upload)
        info = dataset_inspect(root, fmt)
    except (DatasetFilesError, DomainError) as e:
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)
        uploads.upload_discard(upload)
        raise DomainError(str(e), field="files") from None
    organization = upload.organization
    published = None
    try:
        with transaction.atomic():
            dataset, _ = RegisteredDataset.objects.get_or_create(
                organization=organization, name=upload.name, defaults={"description": upload.description}
            )
            dataset = RegisteredDataset.objects.select_for_update().get(pk=dataset.pk)
            number = (dataset.versions.aggregate(n=Max("version"))["n"] or 0) + 1
            prefix = storage.organization_prefix(organization.slug)
            uri = storage.file_uri(prefix, f"datasets/{dataset.name}/{number}")
            version = DatasetVersion.objects.create(
                dataset=dataset,
                version=number,
                format=fmt,
                uri=uri,
                files=[{k: f[k] for k in ("path", "size", "sha256")} for f in upload.files],
                size_bytes=upload.size_bytes,
                uploaded_by=upload.user,
                **info,
            )
            Upload.objects.filter(pk=upload.pk).delete()
            storage.store().publish_dir(root, uri)
            published = uri
    except BaseException:
        if published:
            storage.store().remove_dir(published)
        raise
    finally:
        shutil.rmtree(root, ignore_errors=True)
    uploads.upload_discard(upload)
    return version


def dataset_list(organization: Organization):
    return RegisteredDataset.objects.filter(organization=organization).prefetch_related("versions")


def dataset_get(organization: Organization, name: str) -> RegisteredDataset:
    dataset = dataset_list(organization).filter(name=name).first()
    if dataset is None:
        raise NotFound(f"no dataset {organization.slug}/{name} in your organization")
    return dataset


class DatasetResolver:
    """portal.services.model_refs' DatasetResolver: `owner/name@version` -> that version's directory."""

    def resolve(self, organization: Organization, ref: ModelRef) -> ResolvedModel:
        if ref.owner != organization.slug:
            raise NotFound(f"no dataset {ref.owner}/{ref.name} in your organization")
        dataset = dataset_get(organization, ref.name)
        versions = list(dataset.versions.all())
        if ref.version == "latest":
            found = max(versions, key=lambda v: v.version, default=None)
        else:
            found = next((v for v in versions if str(v.version) == ref.version), None)
        if found is None:
            raise NotFound(f"{ref.owner}/{ref.name} has no version {ref.version}")
        columns = tuple(str(c.get("name")) for c in found.columns if isinstance(c, dict))
        return ResolvedModel(ref=f"{ref.owner}/{ref.name}@{found.version}", uri=found.uri, columns=columns)

    def uri_problem(self, organization: Organization, uri: str) -> str | None:
        """Why a raw URI under the organization's datasets/ may not be used (None: not there, or a stored
        version's directory; a version row exists only once its files were checked and published)."""
        where = registry_location(organization, uri, "datasets")
        if where is None or isinstance(where, str):
            return where
        name, number = where
        if not DatasetVersion.objects.filter(
            dataset__organization=organization, dataset__name=name, version=number
        ).exists():
            return f"{uri!r} is not a stored version of a dataset in your organization's registry"
        return None
