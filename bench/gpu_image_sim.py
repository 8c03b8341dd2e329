"""Run a Python program here as if on the lent GPU machine: only its image's packages and our wheels import.

    .venv/bin/python bench/gpu_image_sim.py -m pytest ...      (or: SCRIPT.py ARGS..., or: -c CODE)

Every distribution installed here that is neither in the image's package list (IMAGE, read from the device
notes' KINDS.md, 2026-11-17) nor in bench/gpu_wheels.txt is hidden: its modules raise ModuleNotFoundError,
`importlib.util.find_spec` returns None and `importlib.metadata` does not see it, as on the machine itself.
So `GPU_CHECK_DRY=1 bench/gpu_check.sh` catches an import of Ray, Django or psycopg (or of a package
nobody ships) on the GPU path before a GPU session is spent on it. Versions stay this venv's.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.metadata
import os
import re
import runpy
import sys
from pathlib import Path

from packaging.requirements import Requirement

HERE = Path(__file__).resolve().parent
IMAGE = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
humanize huggingface-hub hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-
cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-
operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py
mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda
numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13
nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec
patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-
cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu
safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-
data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq
torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions typing-
inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
"""
# The project's own packages run from the checkout there; the platform's (portal, workers...) need Django.
OWN = {"gpu_runtime", "opentinker", "tests", "bench"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def shipped() -> set[str]:
    lines = (HERE / "gpu_wheels.txt").read_text().splitlines()
    return {_norm(re.split(r"[=<>!~ ]", s.strip(), maxsplit=1)[0]) for s in lines if s.strip()[:1].isalnum()}


def _with_requirements(names: set[str]) -> set[str]:
    """`names` and, transitively, what their versions installed here require (no extras): where this venv's
    version of an image package needs more than the image's version (huggingface-hub 2 needs httpx2), the
    image's own, consistent install does not miss it; Ray, Django and psycopg are nobody's requirement."""
    installed = {_norm(d.metadata["Name"]): d for d in importlib.metadata.distributions()}
    todo, seen = list(names), set(names)
    while todo:
        d = installed.get(todo.pop())
        for line in (d.requires or []) if d else []:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue  # an extra's, or another platform's
            name = _norm(req.name)
            if name not in seen:
                seen.add(name)
                todo.append(name)
    return seen


def hidden() -> tuple[set[str], set[str]]:
    """(distributions, top-level module names) that the GPU machine would not have."""
    allowed = _with_requirements({_norm(n) for n in IMAGE.split()} | shipped())
    dists = {_norm(d.metadata["Name"]) for d in importlib.metadata.distributions()} - allowed
    modules = {
        top
        for top, owners in importlib.metadata.packages_distributions().items()
        if top not in OWN and all(_norm(o) in dists for o in owners)
    }
    return dists, modules


class _ImageOnly(importlib.abc.MetaPathFinder):
    """Stands in for the path finder: finds nothing of a hidden distribution, modules nor metadata."""

    def __init__(self, dists: set[str], modules: set[str]) -> None:
        self.dists, self.modules = dists, modules

    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] in self.modules:
            return None
        return importlib.machinery.PathFinder.find_spec(fullname, path, target)

    def find_distributions(self, context=importlib.metadata.DistributionFinder.Context()):  # noqa: B008
        for d in importlib.machinery.PathFinder.find_distributions(context):
            if _norm(d.metadata["Name"] or "") not in self.dists:
                yield d

    def invalidate_caches(self) -> None:
        importlib.machinery.PathFinder.invalidate_caches()


def install() -> _ImageOnly:
    finder = _ImageOnly(*hidden())
    sys.meta_path[:] = [finder if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
    return finder


def main() -> None:
    args = sys.argv[1:]
    if not args:
        sys.exit(__doc__)
    install()
    # As `python -m`/`-c` would: the working directory first, not this file's folder.
    sys.path[0] = os.getcwd()
    if args[0] == "-m":
        sys.argv = [args[1], *args[2:]]
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    elif args[0] == "-c":
        sys.argv = ["-c", *args[2:]]
        exec(compile(args[1], "<string>", "exec"), {"__name__": "__main__"})  # noqa: S102 (our own command)
    else:
        sys.argv = args
        sys.path[0] = str(Path(args[0]).resolve().parent)
        runpy.run_path(args[0], run_name="__main__")


if __name__ == "__main__":
    main()
