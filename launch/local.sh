#!/usr/bin/env bash
# One host, every local GPU, data-parallel (the train step splits the global batch over all devices).
#
#   bash launch/local.sh configs/default.py:mvtec runs/bottle \
#       --config.data.root=/data/mvtec --config.data.category=bottle
#
# Restrict the GPUs with CUDA_VISIBLE_DEVICES=0,1 bash launch/local.sh ...
# Re-running the same command resumes from the latest checkpoint.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
config=$1; workdir=$2; shift 2
# Let XLA use most of the GPU memory up front and keep the input pipeline off the GPU.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
# malloc huge pages for XLA:CPU's temporaries (docs/configuration.md#huge-pages): glibc reads the
# tunable at process start; a tunable the caller set already is kept.
case "${GLIBC_TUNABLES:-}" in
  *glibc.malloc.hugetlb=*) ;;
  *) export GLIBC_TUNABLES="${GLIBC_TUNABLES:+$GLIBC_TUNABLES:}glibc.malloc.hugetlb=1" ;;
esac
exec python -m diff_fastener_jax.train --config "$config" --workdir "$workdir" "$@"
