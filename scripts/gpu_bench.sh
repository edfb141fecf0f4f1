#!/usr/bin/env bash
# The ONE prepared benchmark command for a lent GPU machine (docs/benchmarks.md): a fail-fast
# environment check, the random model folder built once, then one process per variant, every
# step under one global deadline.
#
#   bash scripts/gpu_bench.sh OUTDIR [VARIANT ...]     (default: lockstep_nosync levers levers_merged fused)
#
# Environment: MODEL (sd3.5-medium), DEVICE (cuda), PY (python3), ROUNDS (3), WARMUP (1),
# WORKDIR (random model folder, built once; /tmp/benchwork), BUDGET (seconds for everything,
# default 530), FLOPS (the round's known FLOPs: no FLOP-counting round; default per MODEL, empty
# to count), PROFILE (variants that profile one extra round; default "levers"),
# LIMIT_<variant> (a variant's own limit in seconds), MIN_<variant> (seconds of budget a variant
# needs to start; 30, fused 80), CPU_THREADS (0), BENCH_COMPILE_BACKEND (inductor), CHECK_LIMIT
# (seconds for the check, 60; a loaded 2-core CPU box needs more just to import the packages).
#
# Exit 3 / 4 within 60 s when the check fails (3: packages, 4: device): a rerun still fits.
# Each variant writes OUTDIR/row_<variant>.json the moment it ends; a variant is killed (with
# its whole process group, after -k 10 s the hard way) at its limit or at the deadline, so the
# script ends by BUDGET + ~15 s whatever hangs. OUTDIR/log.txt says what ran, how long, and why
# a row is missing. OUTDIR holds at most: log.txt, versions.json and one row per variant.
set -u
OUTD=${1:?usage: gpu_bench.sh OUTDIR [VARIANT ...]}
shift
MODEL=${MODEL:-sd3.5-medium}; DEVICE=${DEVICE:-cuda}; PY=${PY:-python3}
ROUNDS=${ROUNDS:-3}; WARMUP=${WARMUP:-1}; BUDGET=${BUDGET:-530}; WORKDIR=${WORKDIR:-/tmp/benchwork}
PROFILE=${PROFILE:-levers}
case "$MODEL" in  # the round's FLOPs (mopd geometry; lockstep identical; merged teachers 0.3% fewer)
  sd3.5-medium) FLOPS=${FLOPS-1257919736315904} ;;
  tiny) FLOPS=${FLOPS-4302929664} ;;
  *) FLOPS=${FLOPS-} ;;
esac
VARIANTS=("$@")
[ ${#VARIANTS[@]} -eq 0 ] && VARIANTS=(lockstep_nosync levers levers_merged fused)
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
mkdir -p "$OUTD"
log=$OUTD/log.txt
t0=$(date +%s)
export PYTHONUNBUFFERED=1
left() { echo $(( BUDGET - ($(date +%s) - t0) )); }

default_limit() {  # seconds a variant may take: model load + warm-up (compilation) + timed rounds
  case "$1" in
    levers|compile) echo 300 ;;
    levers_merged) echo 240 ;;
    *) echo 150 ;;
  esac
}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  echo "model $MODEL device $DEVICE rounds $ROUNDS warmup $WARMUP budget $BUDGET s flops ${FLOPS:-counted}" \
       "profile [$PROFILE] variants ${VARIANTS[*]}"
} >> "$log" 2>&1

# 1. fail fast: packages and device, within CHECK_LIMIT (60) s
(cd "$root" && timeout -k 5 "${CHECK_LIMIT:-60}" "$PY" scripts/gpu_bench_check.py --device "$DEVICE" --output "$OUTD/versions.json") \
  >> "$log" 2>&1
rc=$?
if [ "$rc" -ne 0 ]; then
  [ "$rc" -ne 3 ] && rc=4  # a hung or crashed device check is a device problem
  echo "=== check failed (exit $rc) at +$(( $(date +%s) - t0 )) s: see the line above" >> "$log"
  exit "$rc"
fi
echo "=== check ok at +$(( $(date +%s) - t0 )) s" >> "$log"

# 2. the random model folder once, so no variant's limit is spent on it
lim=$(( $(left) - 10 ))
echo "=== prepare (limit $lim s)" >> "$log"
(cd "$root" && timeout -k 10 "$lim" "$PY" scripts/benchmark.py --model "$MODEL" --device "$DEVICE" \
    --workdir "$WORKDIR" --prepare-only) >> "$log" 2>&1
echo "=== prepare rc=$? at +$(( $(date +%s) - t0 )) s" >> "$log"

# 3. the variants, each in its own process, each cut at its limit or the deadline
for name in "${VARIANTS[@]}"; do
  start=$(date +%s)
  remaining=$(left)
  var="LIMIT_$name"; lim=${!var:-$(default_limit "$name")}
  var="MIN_$name"; need=${!var:-$([ "$name" = fused ] && echo 80 || echo 30)}
  [ $(( remaining - 5 )) -lt "$lim" ] && lim=$(( remaining - 5 ))
  if [ "$remaining" -lt "$need" ]; then
    echo "=== $name skipped: ${remaining} s of the budget left, it needs ${need} s" >> "$log"
    continue
  fi
  extra=()
  [ -n "$FLOPS" ] && extra+=(--flops "$FLOPS")
  case " $PROFILE " in *" $name "*) extra+=(--profile) ;; esac
  echo "=== $name (limit $lim s) at +$(( start - t0 )) s" >> "$log"
  (cd "$root" && timeout -k 10 "$lim" "$PY" scripts/benchmark.py --model "$MODEL" --device "$DEVICE" \
      --variants "$name" --workdir "$WORKDIR" --rounds "$ROUNDS" --warmup "$WARMUP" --cpu-threads "${CPU_THREADS:-0}" \
      "${extra[@]}" --output "$OUTD/unused.json" --worker "$name" --worker-output "$OUTD/row_$name.json") >> "$log" 2>&1
  rc=$?
  status=ok; [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && status="killed at its limit"
  [ "$rc" -ne 0 ] && [ "$status" = ok ] && status="failed"
  echo "=== $name rc=$rc ($status) in $(( $(date +%s) - start )) s" >> "$log"
done
echo "=== done at +$(( $(date +%s) - t0 )) s; rows: $(cd "$OUTD" && ls row_*.json 2>/dev/null | tr '\n' ' ')" >> "$log"
