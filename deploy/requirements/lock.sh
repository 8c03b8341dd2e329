#!/bin/sh
# Refreshes the images' dependency locks from pyproject.toml: `sh deploy/requirements/lock.sh`.
# Needs uv (`pip install uv==0.13.8`) and PyPI. Every package pinned with its hashes, for CPython 3.11 on
# x86_64 Linux (the images); the images install them with `pip install --require-hashes --no-deps`.
# - platform.txt: the web, worker, beat and migrations image. The web tier never imports torch, but the
#   workers' model-registry validation runs gpu_runtime/model_check.py (torch, transformers) in the sandbox
#   with this Python, so torch is in (PyPI's Linux build, with CUDA: a CPU-only build needs PyTorch's own
#   index, which this lock does not use).
# - gpu.txt: the runtime on GPU nodes: everything, CUDA torch from PyPI, vLLM (gpu.in) and Ray.
# tests/deploy/test_images.py checks that every dependency of pyproject.toml is in the locks.
set -eu
cd "$(dirname "$0")/../.."
set -- --python-version 3.11 --python-platform x86_64-manylinux_2_28 --generate-hashes --quiet \
  --custom-compile-command "sh deploy/requirements/lock.sh"
uv pip compile pyproject.toml "$@" -o deploy/requirements/platform.txt
uv pip compile pyproject.toml deploy/requirements/gpu.in "$@" -o deploy/requirements/gpu.txt
