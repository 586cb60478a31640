#!/usr/bin/env bash
# The GPU measurements of the benchmark (docs/benchmarks.md) in one run of under 10 minutes on a lent GPU machine
# (the tool library's `device`), whose Python has torch, timm, pandas and matplotlib but not fvcore:
#
#   bash scripts/gpu_benchmark.sh wheels      # here: the pure-Python packages it lacks, as wheels in .whl/
#   device run: command "bash scripts/gpu_benchmark.sh run", carry [".whl"], timeout_s 590
#
# On any GPU machine with the project's venv active: `bash scripts/gpu_benchmark.sh run`.
#
# `run` writes, into $OUT (else results/benchmark), fast_path_cuda_<gpu>.csv first (evit.deploy vs timm's port,
# batch 2048 under AMP: the GPU target), then cuda_<gpu>.csv and .png (evit and peers, batch 2048 and 1), then
# fast_path_cuda_<gpu>_batch1.csv (M0, M2, M4 at batch 1, with evit.deploy replayed as CUDA graphs). Each CSV is
# rewritten after every preset or model, so a run stopped at its time limit keeps what it finished.
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=(fvcore iopath yacs termcolor)

case "${1:-}" in
  wheels)
    pins=$(grep -E "^($(IFS='|'; echo "${wheels[*]}"))==" requirements.lock)
    python3 -m pip wheel -q --no-deps -w .whl $pins
    ls .whl
    ;;
  run)
    if compgen -G ".whl/*.whl" >/dev/null; then  # a machine with the project's venv needs none
      python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/evit-site .whl/*.whl
    fi
    export PYTHONPATH="/tmp/evit-site:$PWD" PYTHONUNBUFFERED=1
    out="${OUT:-results/benchmark}"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    # compiling dominates the fast path (about a minute per preset); the table of peers is only traced
    timeout "${FAST_PATH_S:-260}" python3 -m experiments.benchmark --device cuda --fast-path --quick --out "$out" \
      || echo "fast path stopped (exit $?); the CSV holds the presets it finished"
    timeout "${TABLE_S:-180}" python3 -m experiments.benchmark --device cuda --quick --out "$out" \
      || echo "benchmark stopped (exit $?); the CSV holds the models it finished"
    # at batch 1 a GPU forward is a few hundred launches: the CUDA-graphs lever
    timeout "${BATCH1_S:-100}" python3 -m experiments.benchmark --device cuda --fast-path --cuda-graphs --batch 1 \
      --models evit_m0,evit_m2,evit_m4 --quick --out "$out" \
      || echo "batch-1 fast path stopped (exit $?); the CSV holds the presets it finished"
    ;;
  *)
    echo "usage: bash scripts/gpu_benchmark.sh wheels|run" >&2
    exit 2
    ;;
esac
