#!/usr/bin/env bash
# The GPU check anyone with a CUDA card can run, from the project root, in the project's
# environment:
#
#     bash benchmarks/gpu.sh                 # everything (about 15 minutes on an H100)
#     STEPS="cuda quickstart" bash benchmarks/gpu.sh
#
# Steps, in order (STEPS picks some): versions cuda suite quickstart launch plan sft dpo ppo
#   versions   the card, its memory, the library versions
#   cuda       tests/test_cuda.py: every stage in bf16, a stacked reload, the quickstart
#   suite      the rest of the test suite (python -m pytest -m "not cuda and not notebooks"), on the GPU;
#              with pytest-xdist installed, in XDIST (default 6) workers
#   quickstart python -m adapterkit quickstart --json
#   launch     benchmarks/launch_check.py: each stage through `accelerate launch` (single_gpu.yaml)
#              against the same stage run directly
#   plan       benchmarks/plan_check.py --models 311m: `adapterkit plan` against max_memory_allocated
#   sft, dpo   benchmarks/{sft,dpo}_vs_trl.py at small step counts (both sides fp32 compute)
#   ppo        benchmarks/ppo_vs_trl.py; needs trl 1.12.0 in its own environment
#              (PEER_PYTHON, default .venv-trl112/bin/python; skipped when absent)
#
# A step that runs past its limit is sent SIGINT first (pytest then still prints its failures),
# then killed 30 s later; the cuda and suite steps also write each failure's reason as it
# happens to gpu_<card>_<step>_failures.txt. Each step writes benchmarks/results/gpu_<card>_<step>.json (the card's name in the file
# name and in the JSON) and its log beside it; RESULTS=DIR writes elsewhere. The exit status
# is 0 when every step passed, 1 when one failed, 2 when there is no CUDA GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
card=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" 2>/dev/null)
if [ -z "$card" ]; then
  echo "benchmarks/gpu.sh: no CUDA GPU visible to $PY (torch.cuda.is_available() is False); nothing run" >&2
  exit 2
fi
slug=$(echo "$card" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '-' | sed 's/^-*//; s/-*$//')
results=${RESULTS:-benchmarks/results}
mkdir -p "$results"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
scratch=$(mktemp -d -t adapterkit-gpu-XXXXXX)
trap 'rm -rf "$scratch"' EXIT
t0=$(date +%s)
failed=()

# report STEP RC SECONDS [JSON FILE]: one JSON record per step (the benchmark's report inside)
report() {
  "$PY" - "$results/gpu_${slug}_$1.json" "$1" "$2" "$3" "$card" "${4:-}" "$results/gpu_${slug}_$1.log" <<'EOF'
import json, sys
out, step, rc, seconds, card, inner, log = sys.argv[1:]
record = {"step": step, "card": card, "exit_status": int(rc), "seconds": int(seconds), "log": log}
if inner:
    try:
        record["report"] = json.load(open(inner))
    except (OSError, ValueError) as err:
        record["report_error"] = str(err)
with open(log) as f:
    record["log_tail"] = f.read()[-3000:]
json.dump(record, open(out, "w"), indent=2)
EOF
}

# run STEP LIMIT_S [JSON FILE] -- COMMAND...: run with a time limit, log, record
run() {
  local step=$1 limit=$2 inner=$3; shift 4
  local log="$results/gpu_${slug}_${step}.log" start rc
  echo "=== [$(( $(date +%s) - t0 ))s] $step: $*"
  start=$(date +%s)
  timeout -s INT -k 30 "$limit" "$@" >"$log" 2>&1; rc=$?
  tail -n 15 "$log"
  report "$step" "$rc" "$(( $(date +%s) - start ))" "$inner"
  [ "$rc" -eq 0 ] || failed+=("$step (exit $rc)")
}

for step in ${STEPS:-versions cuda suite quickstart launch plan sft dpo ppo}; do
  case $step in
    versions)   run versions 60 "" -- bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; \
                  $PY -c 'import torch,transformers,peft,trl,bitsandbytes as b; print(torch.__version__, torch.version.cuda, transformers.__version__, peft.__version__, trl.__version__, b.__version__)'";;
    cuda)       ADAPTERKIT_FAILURES="$results/gpu_${slug}_cuda_failures.txt" \
                run cuda 360 "" -- "$PY" -m pytest -q -p no:cacheprovider -m cuda -rA tests/test_cuda.py;;
    suite)      xdist=$("$PY" -c "import xdist" 2>/dev/null && echo "-n ${XDIST:-6}")
                ADAPTERKIT_FAILURES="$results/gpu_${slug}_suite_failures.txt" \
                run suite 420 "" -- "$PY" -m pytest -q -p no:cacheprovider --tb=short -rfEs $xdist -m "not cuda and not notebooks";;
    quickstart) run quickstart 240 "$scratch/quickstart.json" -- bash -c \
                  "$PY -m adapterkit quickstart --out '$scratch/qs' --quiet --json > '$scratch/quickstart.json'";;
    launch)     run launch 300 "$scratch/launch.json" -- "$PY" benchmarks/launch_check.py --out "$scratch/launch.json";;
    plan)       run plan 300 "$scratch/plan.json" -- "$PY" benchmarks/plan_check.py --models 311m --out "$scratch/plan.json";;
    sft)        run sft 200 "$scratch/sft.json" -- "$PY" benchmarks/sft_vs_trl.py --steps 20 --out "$scratch/sft.json";;
    dpo)        run dpo 200 "$scratch/dpo.json" -- "$PY" benchmarks/dpo_vs_trl.py --steps 8 --out "$scratch/dpo.json";;
    ppo)        peer=${PEER_PYTHON:-.venv-trl112/bin/python}
                if [ -x "$peer" ]; then
                  run ppo 300 "$scratch/ppo.json" -- "$PY" benchmarks/ppo_vs_trl.py --steps 4 --peer-python "$peer" \
                    --out "$scratch/ppo.json"
                else
                  echo "=== ppo: skipped (no trl 1.12.0 environment at $peer; see benchmarks/ppo_vs_trl.py)"
                fi;;
    *)          echo "unknown step $step" >&2; failed+=("$step (unknown)");;
  esac
done
echo "=== [$(( $(date +%s) - t0 ))s] done on $card; results in $results/gpu_${slug}_*.json"
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed: ${failed[*]}" >&2
  exit 1
fi
