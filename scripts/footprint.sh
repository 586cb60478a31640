#!/usr/bin/env bash
# Peak memory (RSS) and wall time of the analyses at 224 px on one thread, measured with GNU time:
#   bash scripts/footprint.sh [OUT]          (default OUT: results/footprint.md; scratch outputs go to a temp dir)
# Each row: the command, its peak RSS, its wall time and its target (the numbers in README's "Memory and time").
# FOOTPRINT_QUICK=1 adds the quick reproduction (about 10-20 min from nothing).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-results/footprint.md}
PY=${PY:-.venv/bin/python}
[ -x /usr/bin/time ] || { echo "error: /usr/bin/time (GNU time) is needed: apt-get install time" >&2; exit 2; }
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
export OMP_NUM_THREADS=1
ROWS=()

measure() {  # measure TARGET_GB TARGET_S COMMAND...
  local gb=$1 secs=$2
  shift 2
  echo "== $*" >&2
  /usr/bin/time -f "%M %e" -o "$SCRATCH/time" "$@" >"$SCRATCH/log" 2>&1 \
    || { cat "$SCRATCH/log" >&2; echo "error: '$*' failed" >&2; exit 1; }
  local kb wall label
  read -r kb wall < <(tail -n 1 "$SCRATCH/time")  # GNU time's last line (a failing status line comes first)
  label=$(printf '%s ' "$@" | sed -e "s#^$PY -m ##" -e "s# --out $SCRATCH/[a-z]* # #" -e 's/ *$//')
  ROWS+=("| \`$label\` | $(awk "BEGIN{printf \"%.2f\", $kb/1048576}") GB | $(awk "BEGIN{printf \"%.0f\", $wall}") s | <= $gb GB, <= $secs s |")
}

measure 2.5 60 "$PY" -m analysis.head_similarity --model deit_tiny --weights random --out "$SCRATCH/hs"
measure 3 180 "$PY" -m analysis.taylor_prune --model deit_tiny --weights random --target-macs 0.5 \
  --out "$SCRATCH/tp"
if [ "${FOOTPRINT_QUICK:-0}" = 1 ]; then
  measure 4 1200 "$PY" -m experiments.reproduce --scale quick --force all --out "$SCRATCH/quick"
fi

{
  echo "Measured by \`bash scripts/footprint.sh\` on $(nproc --all) cores, one torch thread, $(date -u +%Y-%m-%d)."
  echo
  echo "| command | peak RSS | wall | target |"
  echo "|---|---|---|---|"
  printf '%s\n' "${ROWS[@]}"
} >"$SCRATCH/table"
mkdir -p "$(dirname "$OUT")"
mv "$SCRATCH/table" "$OUT"
cat "$OUT"
