#!/usr/bin/env bash
# GPU check: install the GPU libraries, then run the pipeline's GPU path end to end and print
# per-stage timings (benchmarks/gpu_check.py): ETL on cudf through a dask-cuda LocalCUDACluster,
# training, export, a real Triton server, served == offline. Budget: 10 minutes in all.
#
#   scripts/gpu_check.sh                 # on a GPU machine with CUDA 12 drivers and pypi.nvidia.com
#   scripts/gpu_check.sh --device cpu    # dry run of the same stages on CPU (no GPU libraries installed)
#   GPU_CHECK_INSTALL=none scripts/gpu_check.sh   # cudf already importable (e.g. the Merlin container)
#
# Why the GPU libraries are not in the locked `gpu` extra (docs/scale.md): on pypi.org, cudf-cu12 and
# dask-cudf-cu12 23.x are placeholder sdists that refuse to install; the first real wheels (24.12)
# need pandas >= 2 and dask 2024.11, which merlin-core 23.8 (pandas < 1.6) cannot take. RAPIDS 23.06
# is the release that pins our dask 2023.3.2 / distributed 2023.3.2.1 (as dask-cuda 23.6.0 does) and
# the first with CUDA 12 wheels, so it is installed here from NVIDIA's index, with the Merlin pins as
# constraints: if it cannot fit them, this step fails and says which package.
# Any other argument goes to `python -m benchmarks.gpu_check` (see --help there).
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE=gpu
prev=
for a in "$@"; do
  if [[ "$a" == "--device=cpu" || ( "$a" == "cpu" && "$prev" == "--device" ) ]]; then DEVICE=cpu; fi
  prev=$a
done
CUDF_VERSION=${CUDF_VERSION:-23.6.*}
INSTALL=${GPU_CHECK_INSTALL:-nvidia-index}     # nvidia-index | none
BUDGET_S=${GPU_CHECK_BUDGET_S:-600}
export UV_PYTHON_DOWNLOADS=${UV_PYTHON_DOWNLOADS:-never}
now() { date +%s.%N; }
since() { awk -v a="$(now)" -v b="$1" 'BEGIN { printf "%.2f", a - b }'; }
stamp() { printf '[gpu_check] %-14s %8s s\n' "$1" "$(since "$2")"; }
t0=$(now)

if [[ "$DEVICE" == gpu ]]; then
  command -v nvidia-smi >/dev/null || { echo "[gpu_check] no nvidia-smi: not a GPU machine (use --device cpu for the dry run)" >&2; exit 2; }
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi

# 1. the locked CPU environment (.venv), exactly as `make install`
t=$(now)
make -s install >/dev/null
stamp "uv_sync" "$t"
UV=$(command -v uv 2>/dev/null || echo "$PWD/.tools/bin/uv")
PY=$PWD/.venv/bin/python

# 2. the GPU libraries (skipped on the CPU dry run, or when cudf already imports)
if [[ "$DEVICE" == gpu && "$INSTALL" != none ]] && ! "$PY" -c "import cudf" 2>/dev/null; then
  t=$(now)
  constraints=$(mktemp)
  "$PY" - > "$constraints" <<'PYEOF'
from importlib.metadata import version
for p in ("dask", "distributed", "dask-cuda", "pandas", "numpy", "numba", "merlin-core", "nvtabular"):
    print(f"{p}=={version(p)}")
PYEOF
  echo "[gpu_check] installing cudf-cu12==$CUDF_VERSION from https://pypi.nvidia.com with constraints: $(tr '\n' ' ' < "$constraints")"
  # uv looks at the extra index first: the real wheels, not pypi.org's placeholders of the same version
  "$UV" pip install --python "$PY" --extra-index-url https://pypi.nvidia.com \
      --constraint "$constraints" "cudf-cu12==$CUDF_VERSION" "dask-cudf-cu12==$CUDF_VERSION" "cupy-cuda12x"
  stamp "gpu_install" "$t"
fi

# 3. the pipeline's GPU path (what is left of the budget)
left=$(awk -v b="$BUDGET_S" -v s="$(since "$t0")" 'BEGIN { printf "%d", b - s }')
(( left > 30 )) || { echo "[gpu_check] no time left after the install" >&2; exit 124; }
rc=0
timeout "$left" "$PY" -m benchmarks.gpu_check "$@" || rc=$?
(( rc == 124 )) && echo "[gpu_check] FAILED: ran past the ${BUDGET_S} s budget" >&2
stamp "total" "$t0"
exit $rc
