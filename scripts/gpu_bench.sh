#!/usr/bin/env bash
# The speed levers' benchmark rows under one global deadline, one process and one JSON per variant.
#
#   bash scripts/gpu_bench.sh OUTDIR [VARIANT ...]
#
# Environment: MODEL (sd3.5-medium), DEVICE (cuda), PY (python3), ROUNDS (3), WARMUP (1),
# WORKDIR (where the random model folder is built once; /tmp/benchwork), BUDGET (seconds for
# the whole script, default 540: one 10-minute slot on a borrowed GPU), LIMIT_<variant> (a
# variant's own limit in seconds, e.g. LIMIT_compile=300).
#
# Each variant runs in its own process (`scripts/benchmark.py --worker`) and writes
# OUTDIR/row_<variant>.json the moment it finishes, so a run cut short by the deadline keeps
# every row that completed. A variant starts only if at least 30 s of the budget are left, and it
# is killed at the deadline. OUTDIR/log.txt records what ran, for how long, and why rows are missing.
set -u
OUTD=${1:?usage: gpu_bench.sh OUTDIR [VARIANT ...]}
shift
MODEL=${MODEL:-sd3.5-medium}; DEVICE=${DEVICE:-cuda}; PY=${PY:-python3}
ROUNDS=${ROUNDS:-3}; WARMUP=${WARMUP:-1}; BUDGET=${BUDGET:-540}; WORKDIR=${WORKDIR:-/tmp/benchwork}
# Default order: the new default first, then each lever alone, then the references.
VARIANTS=("$@")
[ ${#VARIANTS[@]} -eq 0 ] && VARIANTS=(fused compile lockstep merge_teachers levers legacy two_pass)
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
mkdir -p "$OUTD"
log=$OUTD/log.txt
t0=$(date +%s)
export PYTHONUNBUFFERED=1

default_limit() {  # seconds a variant may take (model folder build + FLOP round + warm-up + rounds)
  case "$1" in
    compile|levers) echo 300 ;;
    *) echo 150 ;;
  esac
}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  echo "model $MODEL device $DEVICE rounds $ROUNDS warmup $WARMUP budget $BUDGET s variants ${VARIANTS[*]}"
} >> "$log" 2>&1

# The random model folder once, so the first variant's limit is not spent on it.
left=$(( BUDGET - ($(date +%s) - t0) ))
if [ "$left" -ge 30 ]; then
  echo "=== prepare (limit $left s)" >> "$log"
  (cd "$root" && timeout "$left" "$PY" scripts/benchmark.py --model "$MODEL" --device "$DEVICE" \
      --workdir "$WORKDIR" --prepare-only) >> "$log" 2>&1
  echo "=== prepare rc=$? at +$(( $(date +%s) - t0 )) s" >> "$log"
fi

for name in "${VARIANTS[@]}"; do
  start=$(date +%s)
  left=$(( BUDGET - (start - t0) ))
  var="LIMIT_$name"
  lim=${!var:-$(default_limit "$name")}
  [ "$left" -lt "$lim" ] && lim=$left
  if [ "$lim" -lt 30 ]; then
    echo "=== $name skipped: ${left} s of the budget left" >> "$log"
    continue
  fi
  echo "=== $name (limit $lim s) at +$(( start - t0 )) s" >> "$log"
  (cd "$root" && timeout "$lim" "$PY" scripts/benchmark.py --model "$MODEL" --device "$DEVICE" \
      --variants "$name" --workdir "$WORKDIR" --rounds "$ROUNDS" --warmup "$WARMUP" --cpu-threads "${CPU_THREADS:-0}" \
      --output "$OUTD/unused.json" --worker "$name" --worker-output "$OUTD/row_$name.json") >> "$log" 2>&1
  rc=$?
  status=ok; [ "$rc" -eq 124 ] && status="killed at its limit"; [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && status="failed"
  echo "=== $name rc=$rc ($status) in $(( $(date +%s) - start )) s" >> "$log"
done
echo "=== done at +$(( $(date +%s) - t0 )) s; rows: $(cd "$OUTD" && ls row_*.json 2>/dev/null | tr '\n' ' ')" >> "$log"
