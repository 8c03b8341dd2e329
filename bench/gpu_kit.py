"""`make gpu-kit`: the wheels bench/gpu_check.sh needs on the lent GPU machine, into .whl/, within the budget.

The GPU machine reaches no registry; what its image lacks travels as wheels with the working tree, and the
tree plus carried paths may hold 64 MiB in all. This downloads exactly bench/gpu_wheels.txt (cp312,
manylinux, no dependency resolution: the list names each one), replaces .whl/ with them, and fails when
the tree that travels (tracked and untracked-not-ignored files) plus the wheels exceeds the budget.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / ".whl"
BUDGET = 64 * 2**20  # the device tool's limit on what travels with one call
PLATFORMS = [
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def pins() -> dict[str, str]:
    out = {}
    for line in (ROOT / "bench" / "gpu_wheels.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            if not sep:
                raise SystemExit(f"bench/gpu_wheels.txt: pin an exact version: {line!r}")
            out[_norm(name)] = version.strip()
    return out


def tree_bytes() -> int:
    """What the device tool sends: tracked files and untracked ones git does not ignore (.whl/ is ignored
    and travels only because a call names it in `carry`)."""
    names = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    paths = (ROOT / n.decode() for n in names if n)
    return sum(p.stat().st_size for p in paths if p.is_file())  # a deleted tracked file does not travel


def main() -> int:
    want = pins()
    with tempfile.TemporaryDirectory(prefix="otk-gpu-kit-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
        cmd += ["--python-version", "3.12", "--implementation", "cp", "-d", tmp]
        cmd += [a for p in PLATFORMS for a in ("--platform", p)]
        cmd += [f"{n}=={v}" for n, v in want.items()]
        subprocess.run(cmd, check=True)
        got = {}
        for f in sorted(Path(tmp).glob("*.whl")):
            name, version = f.name.split("-")[:2]
            got[_norm(name)] = (version, f)
        if {n: v for n, (v, _) in got.items()} != want:
            raise SystemExit(f"downloaded {sorted(got)} != bench/gpu_wheels.txt {sorted(want.items())}")
        shutil.rmtree(WHEELS, ignore_errors=True)
        WHEELS.mkdir()
        for _, f in got.values():
            shutil.move(f, WHEELS / f.name)
    wheels = sorted(WHEELS.glob("*.whl"))
    for f in wheels:
        print(f"  {f.stat().st_size / 2**20:6.2f} MiB  {f.name}")
    kit, tree = sum(f.stat().st_size for f in wheels), tree_bytes()
    print(
        f"gpu-kit: {len(wheels)} wheels {kit / 2**20:.1f} MiB + working tree {tree / 2**20:.1f} MiB = "
        f"{(kit + tree) / 2**20:.1f} MiB of the {BUDGET / 2**20:.0f} MiB a device call may carry"
    )
    if kit + tree > BUDGET:
        print("gpu-kit: over the budget: the device call would be refused", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
