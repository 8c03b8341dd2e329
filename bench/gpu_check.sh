#!/usr/bin/env bash
# Every GPU check of the gpu_runtime issue in ONE call on a lent GPU machine (README, "How to run the GPU
# checks"): the GPU smoke tests, rollout throughput, our GRPO step vs TRL's with trainer MFU, a trainer-only
# MFU sweep. Each stage has its own time limit (they sum to 8.5 minutes), its own log under $OUT and a line
# in $OUT/summary.txt; a failing stage does not stop the next. Exit status: the number of failed stages.
#
#   on the GPU machine:  bash bench/gpu_check.sh          (needs `make gpu-kit` run here first: .whl/)
#   here, on CPU:        GPU_CHECK_DRY=1 bench/gpu_check.sh   (tiny preset, a few steps; tests the plumbing)
#
# GPU_CHECK_STAGES picks stages (default: env pytest rollout rl_step mfu; rollout_big, ours at 1,024 rows, is
# for a rerun while the machine is warm: it compiles its decode step for that batch anew);
# GPU_CHECK_LIMITS="rl_step=300" changes a stage's limit (seconds).
# The dry mode runs Python under bench/gpu_image_sim.py: only the image's packages and our wheels import.
set -u
cd "$(dirname "$0")/.."
DRY=${GPU_CHECK_DRY:-0}
STAGES=" ${GPU_CHECK_STAGES:-env pytest rollout rl_step mfu} "
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1 TOKENIZERS_PARALLELISM=false
# Nothing outside the machine can be reached: never wait on the Hugging Face hub.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
# One compile cache for all stages: the decode step compiled by the tests is reused by the benches.
export TORCHINDUCTOR_CACHE_DIR=/tmp/otk-inductor TRITON_CACHE_DIR=/tmp/otk-triton

if [ "$DRY" = 1 ]; then
    OUT=${OUT:-var/gpu-check}
    PY=(${PYTHON:-.venv/bin/python} bench/gpu_image_sim.py)
    DEV=cpu PRESET=tiny-qwen2
    LIMITS=(env=60 pytest=120 rollout=60 rollout_big=60 rl_step=180 mfu=60)
    ROLLOUT="--batch 4 --group 2 --max-new 4 --steps 1"
    ROLLOUT_BIG="--batch 8 --group 4 --max-new 4 --steps 1 --only ours"
    RL_STEP="--prompts 2 --group 2 --max-new 4 --steps 1"
    MFU="--batches 2,4 --prompt-len 8 --completion-len 8 --steps 1"
else
    : "${OUT:?OUT must name the folder for the logs}"
    PY=(python3)
    DEV=cuda PRESET=qwen2.5-0.5b-shape
    # Seconds; the default stages' sum to 510 (8.5 min), leaving time in a 590 s call for the wheels. The first
    # call of our decode engine compiles its step (CUDA graphs) for the batch: about a minute, not timed.
    LIMITS=(env=40 pytest=120 rollout=110 rl_step=190 mfu=50 rollout_big=120)
    # TRL's rollout is `generate` with a dynamic cache ("dynamic" here): the 10x goal is measured against it.
    ROLLOUT="--batch 256 --group 4 --max-new 128 --steps 2 --only ours,dynamic"
    ROLLOUT_BIG="--batch 1024 --group 8 --max-new 128 --steps 2 --only ours"
    RL_STEP="--prompts 16 --group 4 --max-new 256 --steps 3 --peak-tflops 989"
    MFU="--batches 32,64,128 --steps 3 --peak-tflops 989"
fi
mkdir -p "$OUT"
rm -f "$OUT"/*.log  # the dry mode's folder is reused; on the GPU machine $OUT starts empty
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
FAILED=0

# GPU_CHECK_LIMITS="rl_step=300 ..." overrides stage limits (a rerun of one stage with more time).
LIMITS+=(${GPU_CHECK_LIMITS:-})
limit() {
    local kv secs=
    for kv in "${LIMITS[@]}"; do [ "${kv%%=*}" = "$1" ] && secs=${kv#*=}; done
    echo "$secs"
}

# stage NAME COMMAND...: run it under its limit (SIGINT first: Python and pytest print where they were),
# its output to the screen and to $OUT/NAME.log, one line into the summary.
stage() {
    local name=$1 secs rc t0 took verdict
    shift
    case "$STAGES" in *" $name "*) ;; *) return 0 ;; esac
    secs=$(limit "$name")
    local cmd="$*"
    echo "=== $name (limit ${secs}s): ${cmd:0:300}" | tee -a "$OUT/$name.log"
    t0=$(date +%s)
    set -o pipefail
    timeout -s INT -k 15 "$secs" "$@" 2>&1 | tee -a "$OUT/$name.log"
    rc=$?
    set +o pipefail
    took=$(($(date +%s) - t0)) verdict=ok
    [ "$rc" = 0 ] || verdict=FAILED
    [ "$rc" = 124 ] || [ "$rc" = 137 ] && verdict=TIMEOUT
    [ "$rc" = 0 ] || FAILED=$((FAILED + 1))
    printf '%-12s %-9s rc=%-4s %4ss of %ss\n' "$name" "$verdict" "$rc" "$took" "$secs" >>"$SUMMARY"
}

# --- the wheels the image lacks (make gpu-kit): into /tmp/site, ahead of the image's packages ---------------
if [ "$DRY" != 1 ]; then
    ls .whl/*.whl >/dev/null 2>&1 || { echo "no .whl/: run 'make gpu-kit' here and carry .whl" >&2; exit 99; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl >"$OUT/wheels.log" 2>&1 || { cat "$OUT/wheels.log"; echo "wheel install failed" >&2; exit 98; }
    cat "$OUT/wheels.log" >>"$OUT/env.log" && rm "$OUT/wheels.log"
    export PYTHONPATH=/tmp/site:$PWD
fi

ENV_PY='
import importlib.metadata as md, sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
for d in ["transformers", "accelerate", "peft", "safetensors", "tokenizers", "huggingface-hub", "trl",
          "datasets", "pydantic", "pydantic-core", "typing-extensions", "pyarrow", "pandas", "fsspec", "numpy"]:
    try:
        print(f"  {d} {md.version(d)}")
    except md.PackageNotFoundError:
        print(f"  {d} MISSING")
import gpu_runtime.controller, gpu_runtime.rollout.hf, opentinker.spec  # the GPU path: no Ray, no Django
from trl import GRPOConfig, GRPOTrainer  # the peer in bench/rl_step.py
print("imports ok: gpu_runtime, opentinker.spec, trl.GRPOTrainer")
'
stage env bash -c 'date -u; nvidia-smi || echo "(no nvidia-smi)"; exec "$@"' _ "${PY[@]}" -c "$ENV_PY"
# The pytest config in pyproject.toml wants Django and the embedded services: -c /dev/null drops it, and
# --confcutdir keeps tests/conftest.py (Django fixtures) from loading; -m gpu picks the GPU tests.
stage pytest "${PY[@]}" -m pytest -c /dev/null --rootdir . --confcutdir tests/gpu_runtime -p no:cacheprovider \
    -p no:django -W ignore::pytest.PytestUnknownMarkWarning --continue-on-collection-errors --timeout 90 -m gpu -ra -v tests/gpu_runtime
if [ -f bench/rollout.py ]; then
    stage rollout "${PY[@]}" bench/rollout.py --device "$DEV" --preset "$PRESET" $ROLLOUT
    stage rollout_big "${PY[@]}" bench/rollout.py --device "$DEV" --preset "$PRESET" $ROLLOUT_BIG
fi
stage rl_step "${PY[@]}" bench/rl_step.py --device "$DEV" --preset "$PRESET" $RL_STEP
stage mfu "${PY[@]}" bench/trainer_mfu.py --device "$DEV" --preset "$PRESET" $MFU

# The reply shows only the end of the output: each bench's table, then the summary, last.
echo
for f in rollout rollout_big rl_step mfu; do
    [ -f "$OUT/$f.log" ] && { echo "--- $f"; tail -n 12 "$OUT/$f.log"; }
done
grep -E "passed|failed|error|skipped" "$OUT/pytest.log" 2>/dev/null | tail -n 1
echo "--- summary ($FAILED failed; logs in \$OUT)"
cat "$SUMMARY"
exit "$FAILED"
