"""``client.tinker``: the organization's Tinker-API sessions, training clients and saved weights, and a saved
weights' PEFT adapter down to a directory (``opentinker tinker weights download``).

A download is atomic: files land in ``.<name>.partial/`` next to the destination, each checked against the
size the server listed, and the directory is renamed into place once all are there. The platform records no
sha256 for these files (the model server writes them), so the size is the check.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from opentinker.errors import ApiConnectionError, NotFound, OpenTinkerError

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
OPTIMIZER_FILE = "optimizer.safetensors"
PAGE = 200  # the lists' largest page (the server's api.common.Pagination.max_limit)


class TinkerAPI:
    def __init__(self, client: Any) -> None:
        # The Client that owns it (typed loosely: its module imports this one).
        self._c = client

    def _all(self, path: str, params: dict[str, str] | None = None) -> list[dict[str, Any]]:
        """Every item of a paged list, page after page (the server's largest page, `PAGE`)."""
        rows: list[dict[str, Any]] = []
        while True:
            page = self._c._call("GET", path, params={**(params or {}), "limit": PAGE, "offset": len(rows)})
            rows += page["results"]
            if not page.get("next") or not page["results"]:
                return rows

    def sessions(self) -> list[dict[str, Any]]:
        return self._all("/tinker/sessions")

    def session(self, session_id: str) -> dict[str, Any]:
        return dict(self._c._call("GET", f"/tinker/sessions/{quote(session_id, safe='')}"))

    def models(self, *, session: str | None = None) -> list[dict[str, Any]]:
        return self._all("/tinker/models", {"session": session} if session else None)

    def model(self, model_id: str) -> dict[str, Any]:
        return dict(self._c._call("GET", f"/tinker/models/{quote(model_id, safe='')}"))

    def weights(self, *, model: str | None = None, session: str | None = None) -> list[dict[str, Any]]:
        params = {k: v for k, v in (("model", model), ("session", session)) if v}
        return self._all("/tinker/weights", params)

    def weights_detail(self, ref: str) -> dict[str, Any]:
        """One saved weights by its id or its ``tinker://`` path, with its files."""
        if ref.startswith("tinker://"):
            model = ref.removeprefix("tinker://").split("/", 1)[0]  # tinker://{model}/{kind}/{name}
            found = [w for w in self.weights(model=model) if w["path"] == ref] if model else []
            if not found:
                raise NotFound(f"no saved weights at {ref}", code="not_found")
            ref = str(found[0]["id"])
        if not ref.isdigit():
            raise OpenTinkerError(f"not a weights id or tinker:// path: {ref!r}", code="usage")
        return dict(self._c._call("GET", f"/tinker/weights/{ref}"))

    def download(
        self,
        ref: str,
        dest: str | os.PathLike[str],
        *,
        with_optimizer: bool = False,
        on_file: Callable[[str, int], object] | None = None,
        on_bytes: Callable[[int], object] | None = None,
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The PEFT adapter of saved weights ``ref`` (id or tinker:// path) into the new directory ``dest``
        (meta.json too; the Adam moments with ``with_optimizer``). Returns the weights and the files."""
        dest = Path(dest)
        if dest.exists():
            raise OpenTinkerError(f"{dest} already exists; choose another destination", code="exists")
        weights = self.weights_detail(ref)
        wanted = set(ADAPTER_FILES) | {"meta.json"} | ({OPTIMIZER_FILE} if with_optimizer else set())
        files = [f for f in weights["files"] if f["name"] in wanted]
        missing = [n for n in ADAPTER_FILES if n not in {f["name"] for f in files}]
        if missing:
            raise OpenTinkerError(
                f"{weights['path']} has no {', '.join(missing)} in storage (removed, or not written yet)",
                code="incomplete",
            )
        if with_optimizer and OPTIMIZER_FILE not in {f["name"] for f in files}:
            raise OpenTinkerError(
                f"{weights['path']} holds no optimizer state (a sampler adapter has none)", code="usage"
            )
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.parent / f".{dest.name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        for f in files:
            if on_file is not None:
                on_file(f["name"], f["size"])
            self._fetch(weights["id"], f["name"], partial / f["name"], int(f["size"]), on_bytes)
        os.replace(partial, dest)  # the only moment `dest` appears: complete
        return weights, files

    def _fetch(
        self, weights_id: int, name: str, target: Path, size: int, on_bytes: Callable[[int], object] | None
    ) -> None:
        got = 0
        with target.open("wb") as out, self._c._stream(f"/tinker/weights/{weights_id}/files/{name}") as resp:
            try:
                for chunk in resp.iter_bytes(1 << 20):
                    out.write(chunk)
                    got += len(chunk)
                    if on_bytes is not None:
                        on_bytes(len(chunk))
            except httpx.TransportError as exc:
                raise ApiConnectionError(f"download of {name} interrupted: {exc}") from None
        if got != size:
            raise OpenTinkerError(f"{name}: got {got} bytes, the server listed {size}", code="size_mismatch")
