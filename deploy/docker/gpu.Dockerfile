# syntax=docker/dockerfile:1.7
# The GPU node image: the job runtime (gpu_runtime) with CUDA torch, vLLM and Ray, for Ray clusters (compose's
# ray-head and ray-worker; KubeRay's RayCluster pods). Build from the repository root:
#   docker build -f deploy/docker/gpu.Dockerfile -t opentinker/gpu:0.1.0 .
# Dependencies come from the lock (deploy/requirements/gpu.txt, hashes checked); the CUDA libraries are the
# nvidia-* wheels torch pins, the driver comes from the host (NVIDIA container toolkit / GPU operator).

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS deps
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY deploy/requirements/gpu.txt /tmp/gpu.txt
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --require-hashes --no-deps -r /tmp/gpu.txt

FROM ${PYTHON_IMAGE} AS gpu
# Triton (vLLM, torch.compile) compiles small C helpers at run time: a C compiler and libc headers.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 opentinker \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/opentinker --create-home opentinker
COPY --from=deps /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/home/opentinker/.cache/huggingface
WORKDIR /app
# The runtime's code: the SDK (job spec, environments, sandbox) and gpu_runtime; `python -m gpu_runtime run`.
COPY opentinker/ opentinker/
COPY gpu_runtime/ gpu_runtime/
RUN python -m compileall -q opentinker gpu_runtime
USER 10001:10001
EXPOSE 6379 8265 10001
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 CMD ["ray", "health-check"]
CMD ["ray", "start", "--head", "--port=6379", "--dashboard-host=0.0.0.0", "--dashboard-port=8265", "--num-gpus=0", "--block"]
