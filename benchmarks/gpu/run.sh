#!/usr/bin/env bash
# The offline GPU benchmark: installs from benchmarks/gpu/wheels/ (no network), prints the GPU,
# runs benchmarks/gpu_bench.py on the paper config and tees everything into a results file.
#
#   benchmarks/gpu/run.sh [extra gpu_bench flags, e.g. --steps=20 or --batch=8]
#
# Environment: PYTHON (default python3.11; the wheels are for CPython 3.11), VENV (default
# benchmarks/gpu/.venv, reused when present), RESULTS (default
# benchmarks/gpu/results/<UTC time>.txt).
set -euo pipefail
cd "$(dirname "$0")/../.."

WHEELS=benchmarks/gpu/wheels
PYTHON=${PYTHON:-python3.11}
VENV=${VENV:-benchmarks/gpu/.venv}
RESULTS=${RESULTS:-benchmarks/gpu/results/$(date -u +%Y%m%dT%H%M%SZ).txt}
JAX_VERSION=$(sed -n 's/^jax==\([0-9][0-9.]*\).*/\1/p' requirements.txt)

if ! ls "${WHEELS}"/*.whl > /dev/null 2>&1; then
  echo "error: no wheels in ${WHEELS}; run benchmarks/gpu/prepare_wheels.sh on a machine with" \
       "network first and copy the folder here" >&2
  exit 1
fi
if ! command -v "${PYTHON}" > /dev/null; then
  echo "error: ${PYTHON} not found; the wheels are for CPython 3.11 (set PYTHON=...)" >&2
  exit 1
fi
if ! "${PYTHON}" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "error: ${PYTHON} is Python $("${PYTHON}" -c 'import platform; print(platform.python_version())');" \
       "the wheels are for CPython 3.11 (set PYTHON=...)" >&2
  exit 1
fi
if ! command -v nvidia-smi > /dev/null; then
  echo "error: nvidia-smi not found; this script is for a machine with an NVIDIA GPU" >&2
  exit 1
fi

if [[ ! -x "${VENV}/bin/python" ]]; then
  "${PYTHON}" -m venv "${VENV}"
fi
"${VENV}/bin/python" -m pip install --quiet --no-index --find-links "${WHEELS}" \
  -r requirements.txt "jax[cuda12]==${JAX_VERSION}"

mkdir -p "$(dirname "${RESULTS}")"
export JAX_PLATFORMS=cuda   # fail loudly instead of falling back to the CPU
{
  echo "# gpu_bench $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,power.limit,clocks.max.sm \
    --format=csv
  "${VENV}/bin/python" -c 'import jax, jaxlib; print(f"jax {jax.__version__}, jaxlib {jaxlib.__version__}, devices {jax.devices()}")'
  "${VENV}/bin/python" -m benchmarks.gpu_bench --config=configs/nact.py --volume=60,256,256 \
    --dtypes=float32,bfloat16 "$@"
} 2>&1 | tee "${RESULTS}"
echo "results in ${RESULTS}"
