"""What an uploaded model directory may hold, checked in the web tier without torch or transformers.

Two passes. `files_check` runs on the declared file list before a byte is accepted: safe relative paths,
known kinds of file only (pickle weights and Python code are refused by name), the required files present.
`contents_check` runs on the assembled files before anything is stored: the JSON configs parse and point at
no remote code, and each safetensors file's header (plain JSON) is well formed, its tensors' dtypes are ones
a trainer loads and its offsets cover the file exactly; the parameter count and dtypes come from there. What
needs transformers (the config and tokenizer load, the architecture is supported, the weights fit it) runs
later in the sandbox (gpu_runtime/model_check.py).
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_FILES = 64
PATH_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}(/[A-Za-z0-9][A-Za-z0-9._-]{0,127})?$")
SAFE_SUFFIXES = (".json", ".safetensors", ".txt", ".model", ".jinja", ".md")
# Formats that run code when loaded (pickle) or are code: never accepted, whatever their name says.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz", ".h5")
CODE_SUFFIXES = (".py", ".pyc", ".so", ".sh")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# Keys of a config that make transformers import code shipped with the model.
REMOTE_CODE_KEYS = ("auto_map", "trust_remote_code", "custom_pipelines")
# Written by the platform beside an adapter (its base, read by gpu_runtime/models.py); never uploaded.
RESERVED_NAMES = ("opentinker_base.json",)
SAFETENSORS_DTYPES = ("F32", "F16", "BF16")
MAX_HEADER_BYTES = 100 * 1024 * 1024
DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2}
# JSON files are parsed whole in the web tier: configs are a few KB, tokenizer.json (vocab and merges) tens of
# MB at most (~17 MB for a 256k vocabulary).
CONFIG_FILES = ("config.json", "tokenizer_config.json", "generation_config.json", "adapter_config.json")
CONFIG_JSON_MAX_BYTES = 1024 * 1024
JSON_MAX_BYTES = 50 * 1024 * 1024


class ModelFilesError(ValueError):
    """The upload is refused; the message says why, naming the file."""


@dataclass(frozen=True)
class DeclaredFile:
    path: str
    size: int
    sha256: str


def files_check(files: Iterable[DeclaredFile]) -> None:
    """Refuse a file list that is not a safe-tensors Hugging Face model directory."""
    files = list(files)
    if not files:
        raise ModelFilesError("an upload needs at least one file")
    if len(files) > MAX_FILES:
        raise ModelFilesError(f"at most {MAX_FILES} files in one model")
    seen: set[str] = set()
    for f in files:
        _path_check(f.path)
        if f.path.rsplit("/", 1)[-1] in RESERVED_NAMES:
            raise ModelFilesError(f"{f.path}: a name the platform writes itself; rename or leave it out")
        if f.path in seen:
            raise ModelFilesError(f"{f.path} is listed twice")
        _json_size_check(f.path, f.size)
        seen.add(f.path)
    names = {p.rsplit("/", 1)[-1] for p in seen}
    if is_adapter(seen):
        if "adapter_model.safetensors" not in seen:
            raise ModelFilesError("an adapter needs adapter_model.safetensors (safetensors only)")
        return
    if "config.json" not in seen:
        raise ModelFilesError("config.json is missing: upload a Hugging Face model directory")
    if not any(p.endswith(".safetensors") for p in seen):
        raise ModelFilesError("no .safetensors weights: the registry takes safetensors only")
    if not names & set(TOKENIZER_FILES):
        raise ModelFilesError(
            "no tokenizer: upload tokenizer.json and/or tokenizer_config.json with the model"
        )


def is_adapter(paths: Iterable[str]) -> bool:
    """A PEFT adapter directory (adapter_config.json, no config.json): trained on top of a base model."""
    paths = set(paths)
    return "adapter_config.json" in paths and "config.json" not in paths


def _path_check(path: str) -> None:
    lower = path.lower()
    if lower.endswith(PICKLE_SUFFIXES):
        raise ModelFilesError(
            f"{path}: pickle weights are never loaded (unpickling runs code); convert them to safetensors"
        )
    if lower.endswith(CODE_SUFFIXES):
        raise ModelFilesError(f"{path}: a model may not carry code (remote code is not run)")
    if not PATH_RE.match(path) or ".." in path:
        raise ModelFilesError(
            f"{path!r}: a file path is at most two names of letters, digits, '.', '_' or '-', "
            "not starting with a dot"
        )
    if not lower.endswith(SAFE_SUFFIXES):
        raise ModelFilesError(f"{path}: not a file a model directory holds ({', '.join(SAFE_SUFFIXES)})")


def contents_check(root: Path, files: Iterable[DeclaredFile]) -> dict[str, Any]:
    """Check the assembled files under `root`; returns what the weights say (parameters, dtypes)."""
    parameters, dtypes = 0, set()
    for f in files:
        path = root / f.path
        if f.path.endswith(".json"):
            _json_check(path, f.path)
        elif f.path.endswith(".safetensors"):
            n, kinds = safetensors_header_check(path, f.path)
            parameters += n
            dtypes |= kinds
    return {"parameters": parameters, "dtypes": sorted(dtypes)}


def _json_size_check(name: str, size: int) -> None:
    if not name.endswith(".json"):
        return
    cap = CONFIG_JSON_MAX_BYTES if name.rsplit("/", 1)[-1] in CONFIG_FILES else JSON_MAX_BYTES
    if size > cap:
        raise ModelFilesError(f"{name} is {size} bytes; at most {cap} bytes for this JSON file")


def _json_check(path: Path, name: str) -> None:
    _json_size_check(name, path.stat().st_size)
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelFilesError(f"{name} is not valid JSON ({e})") from None
    if name.rsplit("/", 1)[-1] in CONFIG_FILES:
        if not isinstance(data, dict):
            raise ModelFilesError(f"{name} must hold a JSON object")
        _no_remote_code(data, name)
        # PEFT records the base's class as `auto_mapping` (only AutoPeftModel reads it, which we do not use);
        # anything but a transformers class is code from elsewhere.
        mapping = data.get("auto_mapping") if name.endswith("adapter_config.json") else None
        library = mapping.get("parent_library") if isinstance(mapping, dict) else mapping
        if mapping is not None and not str(library).startswith("transformers."):
            raise ModelFilesError(f"{name}: auto_mapping names {library!r}, not a transformers class")


def _no_remote_code(data: Any, name: str, depth: int = 0) -> None:
    # Nested too: a text_config inside a multimodal config can carry its own auto_map.
    if depth > 8 or not isinstance(data, dict):
        return
    for key in REMOTE_CODE_KEYS:
        if data.get(key):
            raise ModelFilesError(
                f"{name} has {key!r}: models that need remote code are refused (it would run on our servers)"
            )
    for value in data.values():
        _no_remote_code(value, name, depth + 1)


def safetensors_header_check(path: Path, name: str) -> tuple[int, set[str]]:
    """(parameter count, dtypes) from a safetensors header; the file must be exactly header + tensors."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ModelFilesError(f"{name} is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise ModelFilesError(f"{name} is not a safetensors file (header length {n})")
        try:
            header = json.loads(fh.read(n))
        except (ValueError, UnicodeDecodeError):
            raise ModelFilesError(f"{name} is not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise ModelFilesError(f"{name} is not a safetensors file (header is not an object)")
    data_bytes, count, kinds, end = size - 8 - n, 0, set(), 0
    spans = []
    for tensor, meta in header.items():
        if tensor == "__metadata__":
            continue
        ok = isinstance(meta, dict) and isinstance(meta.get("shape"), list)
        offsets = meta.get("data_offsets") if ok else None
        if not ok or not (isinstance(offsets, list) and len(offsets) == 2):
            raise ModelFilesError(f"{name}: tensor {tensor!r} has no shape or offsets")
        dtype = meta.get("dtype")
        if dtype not in SAFETENSORS_DTYPES:
            raise ModelFilesError(
                f"{name}: tensor {tensor!r} is {dtype}; weights must be {', '.join(SAFETENSORS_DTYPES)}"
            )
        numel = 1
        for d in meta["shape"]:
            if not isinstance(d, int) or d < 0:
                raise ModelFilesError(f"{name}: tensor {tensor!r} has a bad shape")
            numel *= d
        start, stop = offsets
        if (
            not (isinstance(start, int) and isinstance(stop, int))
            or stop - start != numel * DTYPE_BYTES[dtype]
        ):
            raise ModelFilesError(f"{name}: tensor {tensor!r}'s offsets do not match its shape")
        spans.append((start, stop))
        count += numel
        kinds.add(dtype)
    for start, stop in sorted(spans):
        if start != end:
            raise ModelFilesError(f"{name}: tensors overlap or leave gaps")
        end = stop
    if end != data_bytes:
        raise ModelFilesError(f"{name}: the tensors take {end} bytes but the file holds {data_bytes}")
    return count, kinds


def sha256_of(chunks: Iterable[bytes], sink: Callable[[bytes], Any]) -> str:
    """Feed `chunks` to `sink` and return their sha256 (hex)."""
    from hashlib import sha256

    h = sha256()
    for chunk in chunks:
        h.update(chunk)
        sink(chunk)
    return h.hexdigest()
