#!/usr/bin/env bash
# One command for the GPU measurements of docs/performance.md (H100 / H200), paper config, bf16 compute:
#
#   bash benchmarks/gpu.sh                    # from the repository root; JSON under ${OUT:-benchmarks}
#
# Compiling the paper's programs on XLA:GPU takes minutes of CPU time (on an H200 host with 16 cores,
# compiles sharing them: 96 s for the inference, 183 s for the train step, 193 s with remat, 58 s for
# each initialisation), and a lease is short. So it runs in two phases that share one persistent compilation
# cache (CACHE, default /tmp/dfj_jax_cache):
#   1. warm, all in parallel, nothing timed: `--init_only` (parameter and train-state initialisation,
#      once per model variant) and `--compile_only` for each program below, without preallocating GPU
#      memory. Their records (compile s, GFLOP/image, XLA's planned memory) are warm_*.json, logs warm_*.log.
#   2. timed, one process after another, once every warm-up has ended: each loads its programs from the
#      cache, runs one warm-up call and REPEATS timed ones, with the GPU and the CPU to itself. (Timing
#      while other programs still compile costs 14% of the inference and 45% of the train step's
#      speed on the H200: docs/performance.md.) A warm-up still running when only the timed phase's share of
#      BUDGET_S is left is stopped, and its program is not timed.
# Programs: inference at INFER_BATCHES (default 128,256: one process compiles both in turn; 128 runs at
# 296 img/s on the H200), the train step at TRAIN_BATCH (default 16, no
# remat), and at REMAT_BATCH with model.remat=blocks (default 32; 0 skips it).
# If the fused cuDNN attention fails to compile, the inference is retried with model.attention=xla.
#
# Needs: python3 with jax[cuda] (0.10+), flax, optax, ml_collections, grain, absl on PYTHONPATH. No
# installs (on this workplace's H200 image ml_collections, grain, array_record, portpicker travel as wheels).
# Knobs (env): CONFIG (default configs/default.py), INFER_BATCHES, TRAIN_BATCH, REMAT_BATCH, REPEATS
# (default 3), BUDGET_S (default 540: nothing runs past it), AUTOTUNE (XLA:GPU autotune level; unset keeps
# XLA's default), CACHE, EXTRA (more --config.a.b=v overrides). Each benchmark prints its stages with a
# clock on stderr. CPU check of the script itself:
#   CONFIG=configs/demo.py:smoke INFER_BATCHES=2,4 TRAIN_BATCH=4 REMAT_BATCH=4 BUDGET_S=1500 \
#     OUT=/tmp/gpu_check bash benchmarks/gpu.sh
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# XLA takes this share of the GPU in the timed phase (the default, 75%, may not hold a train step at
# batch 32 without remat: 72 GiB on the H200).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
if [[ -n "${AUTOTUNE:-}" ]]; then export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_autotune_level=$AUTOTUNE"; fi
CACHE=${CACHE:-/tmp/dfj_jax_cache}
export JAX_COMPILATION_CACHE_DIR=$CACHE
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0.5
PY=${PY:-python3}
DEST=${OUT:-benchmarks}
mkdir -p "$DEST" "$CACHE"
CONFIG=${CONFIG:-configs/default.py}
INFER_BATCHES=${INFER_BATCHES:-128,256}
TRAIN_BATCH=${TRAIN_BATCH:-16}
REMAT_BATCH=${REMAT_BATCH:-32}
REPEATS=${REPEATS:-3}
BUDGET_S=${BUDGET_S:-540}
export PYTHONUNBUFFERED=1  # a process killed at the budget still shows how far it got
EXTRA=${EXTRA:-}
START=$SECONDS
STATUS=0
declare -A WARM_PID=()

"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())" || exit 1
left() { echo $((BUDGET_S - (SECONDS - START))); }

BM=("$PY" -m diff_fastener_jax.benchmark --config "$CONFIG" --config.model.dtype=bfloat16)  # EXTRA goes last

warm() {  # warm <name> <args...>: a background compile-only (or init-only) run -> warm_<name>.json/.log
  local name=$1; shift
  echo "== warm $name (t=$((SECONDS - START))s)"
  # shellcheck disable=SC2086
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout "$(left)" "${BM[@]}" --out "$DEST/warm_$name.json" "$@" $EXTRA \
    >"$DEST/warm_$name.log" 2>&1 &
  WARM_PID[$name]=$!
}

wait_warm() {  # wait_warm <name> <seconds to keep for what follows>: until that warm-up ends
  local pid=${WARM_PID[$1]:-}
  [[ -z "$pid" ]] && return 0
  while kill -0 "$pid" 2>/dev/null && (( $(left) > $2 )); do sleep 2; done
  if kill -0 "$pid" 2>/dev/null; then echo "== warm $1: still compiling at t=$((SECONDS - START))s"; return 1; fi
  wait "$pid"; local rc=$?
  echo "== warm $1: exit $rc at t=$((SECONDS - START))s"
  (( rc )) && tail -n 5 "$DEST/warm_$1.log"
  return $rc
}

bench() {  # bench <name> <seconds to keep for later steps> <args...>: one timed run -> gpu_<name>.json
  local name=$1 keep=$2; shift 2
  local limit=$(( $(left) - keep ))
  if (( limit < 30 )); then echo "== $name: skipped (time budget spent)"; STATUS=1; return 1; fi
  echo "== $name (limit ${limit}s, t=$((SECONDS - START))s)"
  # shellcheck disable=SC2086
  timeout "$limit" "${BM[@]}" --repeats "$REPEATS" --out "$DEST/gpu_$name.json" "$@" $EXTRA
  local rc=$?
  (( rc )) && { echo "== $name: FAILED (exit $rc)"; STATUS=1; }
  return $rc
}

# ---- phase 1: warm the cache (parallel)
warm init --init_only
warm infer --compile_only --batch_sizes "$INFER_BATCHES" --train_batch 0
warm train --compile_only --batch_sizes 0 --train_batch "$TRAIN_BATCH"
TIMED_S=90  # what the timed phase needs: about 15 s (inference) and 30-40 s per train step from the cache
if (( REMAT_BATCH > 0 )); then
  warm init_remat --init_only --config.model.remat=blocks  # remat changes the init program's HLO
  warm remat --compile_only --batch_sizes 0 --train_batch "$REMAT_BATCH" --config.model.remat=blocks
  TIMED_S=140
fi
for name in init infer train init_remat remat; do
  [[ -n "${WARM_PID[$name]:-}" ]] && { wait_warm "$name" "$TIMED_S"; eval "ok_$name=$?"; }
done
for n in "${!WARM_PID[@]}"; do kill "${WARM_PID[$n]}" 2>/dev/null; done  # over time: not timed below
wait

# ---- phase 2: timed runs, one at a time
if (( ${ok_infer:-1} == 0 )); then
  bench infer 60 --batch_sizes "$INFER_BATCHES" --train_batch 0
elif grep -q -i "cudnn\|dot_product_attention" "$DEST/warm_infer.log" 2>/dev/null; then
  # the compile failed on the fused attention: time the XLA attention instead (compiles here)
  bench infer_xla_attention 60 --batch_sizes "$INFER_BATCHES" --train_batch 0 --config.model.attention=xla
fi
(( ${ok_train:-1} == 0 )) && bench train_b"$TRAIN_BATCH" 40 --batch_sizes 0 --train_batch "$TRAIN_BATCH"
if (( REMAT_BATCH > 0 && ${ok_remat:-1} == 0 )); then
  bench train_b"${REMAT_BATCH}"_remat 0 --batch_sizes 0 --train_batch "$REMAT_BATCH" --config.model.remat=blocks
fi
(( ${ok_infer:-1} || ${ok_train:-1} )) && STATUS=1

"$PY" - "$DEST" <<'PYEOF'
import glob, json, os, sys
rows = []
for path in sorted(glob.glob(os.path.join(sys.argv[1], "gpu_*.json"))) + sorted(glob.glob(os.path.join(sys.argv[1], "warm_*.json"))):
    r = json.load(open(path))
    name = os.path.basename(path)[:-5]
    if r.get("init_only"):
        print(f"{name}: init s (compile + run) {r['init_s']}")
        continue
    for what, row in [("infer", x) for x in r["infer"]] + ([("train", r["train"])] if r.get("train") else []):
        mem = row.get("xla_peak_memory_bytes")
        comp = r["compile_s"].get("train" if what == "train" else f"infer_b{row['batch']}")
        rows.append((name, what, row["batch"], row.get("images_per_s"), row.get("tflops"),
                     row.get("fraction_of_peak"), row["gflops_per_image"], mem, comp, r["device"], r["attention"],
                     r["remat"], r.get("peak_memory_bytes")))
print("\n| run | program | batch | img/s | TFLOP/s | of peak | GFLOP/img | XLA mem GiB | compile s | "
      "runtime peak GiB | device | attention | remat |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
f = lambda v, s: "-" if v is None else format(v, s)  # noqa: E731
for n, w, b, ips, tf, fp, g, mem, comp, dev, att, rem, peak in rows:
    print(f"| {n} | {w} | {b} | {f(ips, '.1f')} | {f(tf, '.1f')} | {f(fp, '.1%')} | {g:.0f} | "
          f"{f(mem and mem / 2**30, '.2f')} | {f(comp, '.0f')} | {f(peak and peak / 2**30, '.2f')} | {dev} | {att} | {rem} |")
PYEOF
echo "gpu.sh: done in $((SECONDS - START)) s, status $STATUS"
exit $STATUS
