#!/bin/sh
# Refreshes the images' dependency locks from pyproject.toml: `sh deploy/requirements/lock.sh`.
# Needs uv (`pip install uv==0.13.8`) and PyPI. Every package pinned with its hashes, for CPython 3.11 on
# x86_64 Linux (the images); the images install them with `pip install --require-hashes --no-deps`.
# - platform.txt: the web, worker, beat and migrations image. The web tier never imports torch (import-linter
#   contract "web-tier"), so torch and peft (which pulls torch) are overridden away: gigabytes of CUDA less.
# - gpu.txt: the runtime on GPU nodes: everything, CUDA torch from PyPI, vLLM (gpu.in) and Ray.
# tests/deploy/test_images.py checks that every dependency of pyproject.toml is in the locks.
set -eu
cd "$(dirname "$0")/../.."
set -- --python-version 3.11 --python-platform x86_64-manylinux_2_28 --generate-hashes --quiet \
  --custom-compile-command "sh deploy/requirements/lock.sh"
uv pip compile pyproject.toml --override deploy/requirements/platform-overrides.txt "$@" \
  -o deploy/requirements/platform.txt
uv pip compile pyproject.toml deploy/requirements/gpu.in "$@" -o deploy/requirements/gpu.txt
