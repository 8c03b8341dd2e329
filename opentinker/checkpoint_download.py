"""A whole checkpoint of a job, down to a directory or a .tar.gz (``opentinker jobs download ID``).

Atomic and resumable: files land in ``.<name>.partial/`` next to the destination, each one verified against
the sha256 the platform recorded; the directory is renamed into place only once every file is there, so a
destination that exists is complete. Run again after an interruption and the files already in the partial
directory whose sha256 matches are kept, not fetched again.

The partial directory is keyed by the destination only, so it holds a manifest (MANIFEST: the job, the
checkpoint and its step, every wanted file with its sha256): a rerun for another checkpoint, another step or
another file set (``--with-trainer-state`` or not) into the same destination starts over instead of mixing
two checkpoints' files, and a file the manifest does not list (a leftover temporary file) is removed.

Trainer state (optimizer, scheduler, RNG: ``trainer_state.pt``, per policy in multi-agent checkpoints) is
what an exact resume needs and is most of a full checkpoint's size; it is left out unless asked for.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from opentinker.errors import NotFound, OpenTinkerError
from opentinker.progress import Progress
from opentinker.storage import file_sha256
from opentinker.types import Checkpoint, CheckpointFile
from opentinker.watch_view import CONTROL

if TYPE_CHECKING:
    from opentinker.client import Client

TRAINER_STATE = "trainer_state.pt"
MANIFEST = ".opentinker-download.json"  # in the partial directory only; removed before it is put in place


@dataclass
class Downloaded:
    path: Path
    checkpoint: Checkpoint
    files: list[CheckpointFile] = field(default_factory=list)
    size: int = 0
    verified: int = 0  # files whose sha256 the platform knew and that matched


def pick_checkpoint(checkpoints: list[Checkpoint], step: int | None) -> Checkpoint:
    """The checkpoint of ``step``, or the latest one (highest step)."""
    if not checkpoints:
        raise NotFound("this job has no checkpoints yet", code="not_found")
    if step is None:
        return max(checkpoints, key=lambda c: (c.step or 0, c.created_at or 0))
    for c in checkpoints:
        if c.step == step:
            return c
    steps = ", ".join(str(c.step) for c in sorted(checkpoints, key=lambda c: c.step or 0))
    raise NotFound(f"no checkpoint at step {step} (steps: {steps})", code="not_found")


def wanted_files(checkpoint: Checkpoint, *, with_trainer_state: bool) -> list[CheckpointFile]:
    files = []
    for f in checkpoint.files:
        parts = PurePosixPath(f.name).parts
        # Names come from the server: never let one climb out of the destination or drive the terminal.
        if not parts or f.name.startswith("/") or ".." in parts or CONTROL.search(f.name):
            raise OpenTinkerError(f"refusing a checkpoint file named {f.name!r}", code="bad_file_name")
        if f.name == MANIFEST:
            raise OpenTinkerError(f"refusing a checkpoint file named {f.name!r}", code="bad_file_name")
        if parts[-1] == TRAINER_STATE and not with_trainer_state:
            continue
        files.append(f)
    return files


def download_checkpoint(
    client: Client,
    job_id: str,
    dest: str | os.PathLike[str],
    *,
    step: int | None = None,
    archive: bool = False,
    with_trainer_state: bool = False,
    progress: Progress | None = None,
) -> Downloaded:
    """Download checkpoint ``step`` (default: the latest) of ``job_id`` to the directory ``dest``, or to the
    .tar.gz file ``dest`` with ``archive``. ``dest`` must not exist yet."""
    dest = Path(dest)
    if dest.exists():
        raise OpenTinkerError(f"{dest} already exists; choose another destination", code="exists")
    checkpoint = pick_checkpoint(client.jobs.checkpoints(job_id), step)
    files = wanted_files(checkpoint, with_trainer_state=with_trainer_state)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.parent / f".{dest.name}.partial"
    _prepare_partial(partial, job_id, checkpoint, files)
    total = sum(f.size or 0 for f in files)
    progress = progress or Progress(total, tty=False, stream=io.StringIO())
    progress.total = total
    result = Downloaded(path=dest, checkpoint=checkpoint, files=files, size=total)
    try:
        for f in files:
            target = partial / f.name
            if f.sha256 and target.is_file() and file_sha256(target) == f.sha256.lower():
                progress.skip_file(f.name, target.stat().st_size)
                result.verified += 1
                continue
            progress.start_file(f.name)
            client.jobs.download(
                job_id, checkpoint.id, f.name, target, sha256=f.sha256 or None, on_bytes=progress.advance
            )
            result.verified += bool(f.sha256)
            progress.finish_file(f.name, target.stat().st_size, bool(f.sha256))
    finally:
        progress.close()
    (partial / MANIFEST).unlink()
    if archive:
        _archive(partial, dest)
        shutil.rmtree(partial)
    else:
        os.replace(partial, dest)  # the only moment `dest` appears: complete
    return result


def _prepare_partial(partial: Path, job_id: str, checkpoint: Checkpoint, files: list[CheckpointFile]) -> None:
    """The partial directory for these files: kept from an earlier run only if that run wanted exactly the
    same files of the same checkpoint (else emptied), and holding only the files the manifest lists."""
    manifest = {
        "job": job_id,
        "checkpoint": checkpoint.id,
        "step": checkpoint.step,
        "files": [{"name": f.name, "size": f.size, "sha256": (f.sha256 or "").lower()} for f in files],
    }
    path = partial / MANIFEST
    try:
        same = json.loads(path.read_text()) == manifest
    except (OSError, ValueError):
        same = False  # none (a new download, or one from before manifests) or unreadable: start over
    if not same and partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(exist_ok=True)
    names = {f.name for f in files}
    for p in sorted(partial.rglob("*"), reverse=True):  # children before their folder
        rel = p.relative_to(partial).as_posix()
        if p.is_dir() and not p.is_symlink():
            with contextlib.suppress(OSError):
                p.rmdir()  # only if empty: a folder the listed files no longer need
        elif rel not in names and rel != MANIFEST:
            p.unlink()
    if not same:
        tmp = partial / f"{MANIFEST}.tmp"
        tmp.write_text(json.dumps(manifest))
        os.replace(tmp, path)


def _archive(directory: Path, dest: Path) -> None:
    """A .tar.gz of the directory's files under one top folder named after the archive, written atomically."""
    top = dest.name.removesuffix(".gz").removesuffix(".tar").removesuffix(".tgz")
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    os.close(fd)
    try:
        with tarfile.open(tmp, "w:gz") as tar:
            for path in sorted(p for p in directory.rglob("*") if p.is_file()):
                tar.add(path, arcname=f"{top}/{path.relative_to(directory).as_posix()}")
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
