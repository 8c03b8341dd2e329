"""Package archives: the registry's name for `opentinker.env.archive`, which the runtime shares (it may not
import the registry, so the checks live in the SDK)."""

from opentinker.env.archive import (
    ENTRYPOINT_RE,
    MANIFEST_NAME,
    MAX_ARCHIVE_BYTES,
    MAX_MEMBERS,
    MAX_UNPACKED_BYTES,
    SEMVER_RE,
    ArchiveError,
    Manifest,
    Package,
    extract_archive,
    inspect_archive,
    manifest_parse,
    read_capped,
)

__all__ = [
    "ENTRYPOINT_RE",
    "MANIFEST_NAME",
    "MAX_ARCHIVE_BYTES",
    "MAX_MEMBERS",
    "MAX_UNPACKED_BYTES",
    "SEMVER_RE",
    "ArchiveError",
    "Manifest",
    "Package",
    "extract_archive",
    "inspect_archive",
    "manifest_parse",
    "read_capped",
]
