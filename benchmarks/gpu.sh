#!/usr/bin/env bash
# One command for the GPU rows of benchmarks/RESULTS.md (H100 / H200), paper config, bf16 compute:
#
#   bash benchmarks/gpu.sh                    # from the repository root; JSON under ${OUT:-benchmarks}
#
# Steps (each under its own time limit; a failed step is reported and the next one still runs):
#   1. inference at batch sizes that fill the GPU (INFER_BATCHES, default 128: each size is one compile)
#   2. the train step at TRAIN_BATCH (default 16, no remat)
#   3. the train step at REMAT_BATCH with model.remat=blocks (default 0: skipped)
# Sized for one call of a 15-minute GPU lease (about 9 minutes): on an H200 the paper's programs took
# more than 40 s (inference) and 90 s (train step) to compile (RESULTS.md, 2026-11-28), so the
# defaults spend the time on two programs, not four.
# Every record also holds what --compile_only reports (compile seconds, GFLOP/image,
# xla_peak_memory_bytes per program) plus the runtime's peak device memory. If the fused cuDNN
# attention fails to compile, step 1 is retried with model.attention=xla.
#
# Needs: python3 with jax[cuda] (0.10+), flax, optax, ml_collections, absl on PYTHONPATH. No installs.
# Knobs (env): CONFIG (default configs/default.py), INFER_BATCHES, TRAIN_BATCH, REMAT_BATCH (0 skips),
# REPEATS (default 3), BUDGET_S (default 540: no step runs past it), LIMIT_X (multiplies every step's
# time limit; default 1), AUTOTUNE (XLA:GPU autotune level; see below), EXTRA (more --config.a.b=v
# overrides). Each benchmark prints its stages with a clock on stderr. CPU check of the script itself:
#   CONFIG=configs/demo.py:smoke INFER_BATCHES=2,4 TRAIN_BATCH=4 REMAT_BATCH=4 LIMIT_X=8 BUDGET_S=3000 \
#     bash benchmarks/gpu.sh
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# Let XLA take most of the GPU (default preallocation is 75%): the train steps are memory-bound.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
# XLA:GPU times candidate kernels for every convolution while compiling. AUTOTUNE=0 picks cuDNN's
# heuristic choice instead (shorter compiles, possibly slower kernels); unset keeps XLA's default.
# The record's compile_s says what it cost (RESULTS.md: on an H200 neither setting compiled the
# paper's programs within these limits while parameter init still ran eagerly, 2026-11-28).
if [[ -n "${AUTOTUNE:-}" ]]; then export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_autotune_level=$AUTOTUNE"; fi
PY=${PY:-python3}
DEST=${OUT:-benchmarks}
mkdir -p "$DEST"
CONFIG=${CONFIG:-configs/default.py}
INFER_BATCHES=${INFER_BATCHES:-128}
TRAIN_BATCH=${TRAIN_BATCH:-16}
REMAT_BATCH=${REMAT_BATCH:-0}
REPEATS=${REPEATS:-3}
BUDGET_S=${BUDGET_S:-540}
LIMIT_X=${LIMIT_X:-1}
export PYTHONUNBUFFERED=1  # a step killed by its time limit still shows how far it got
EXTRA=${EXTRA:-}
START=$SECONDS
STATUS=0

"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())" || exit 1

bench() {  # bench <name> <time limit s> <args...>: one benchmark run -> $DEST/gpu_<name>.json
  local name=$1 limit=$(($2 * LIMIT_X)); shift 2
  local left=$((BUDGET_S - (SECONDS - START)))
  if (( left < 30 )); then echo "== $name: skipped (time budget spent)"; STATUS=1; return 1; fi
  (( limit > left )) && limit=$left
  echo "== $name (limit ${limit}s, t=$((SECONDS - START))s)"
  # shellcheck disable=SC2086
  timeout "$limit" "$PY" -m diff_fastener_jax.benchmark --config "$CONFIG" --config.model.dtype=bfloat16 \
    --repeats "$REPEATS" --out "$DEST/gpu_$name.json" "$@" $EXTRA
  local rc=$?
  (( rc )) && { echo "== $name: FAILED (exit $rc)"; STATUS=1; }
  return $rc
}

bench infer 220 --batch_sizes "$INFER_BATCHES" --train_batch 0
rc=$?
if (( rc != 0 && rc != 124 )); then  # an error (not the time limit): retry without the cuDNN attention
  bench infer_xla_attention 150 --batch_sizes "$INFER_BATCHES" --train_batch 0 --config.model.attention=xla
fi
bench train_b$TRAIN_BATCH 290 --batch_sizes 0 --train_batch "$TRAIN_BATCH"
if (( REMAT_BATCH > 0 )); then
  bench train_b${REMAT_BATCH}_remat 290 --batch_sizes 0 --train_batch "$REMAT_BATCH" --config.model.remat=blocks
fi

"$PY" - "$DEST" <<'PYEOF'
import glob, json, os, sys
rows = []
for path in sorted(glob.glob(os.path.join(sys.argv[1], "gpu_*.json"))):
    r = json.load(open(path))
    name = os.path.basename(path)[4:-5]
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
