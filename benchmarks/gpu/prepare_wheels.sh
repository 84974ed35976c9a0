#!/usr/bin/env bash
# Downloads every wheel the offline GPU benchmark needs into benchmarks/gpu/wheels/.
#
# Run on a machine WITH network (any OS/CPU: the wheels are picked for the GPU machine,
# Linux x86_64 / CPython 3.11), then copy the repository with its wheels/ folder to the GPU
# machine and run benchmarks/gpu/run.sh there. The set is requirements.txt (pinned) plus
# jax[cuda12] at the same JAX version, which brings the CUDA 12 plugin and the NVIDIA
# runtime wheels (several GB).
#
#   benchmarks/gpu/prepare_wheels.sh           # download
#   benchmarks/gpu/prepare_wheels.sh --check   # resolve only (pip install --dry-run, metadata only)
set -euo pipefail
cd "$(dirname "$0")/../.."

DEST=benchmarks/gpu/wheels
JAX_VERSION=$(sed -n 's/^jax==\([0-9][0-9.]*\).*/\1/p' requirements.txt)
if [[ -z "${JAX_VERSION}" ]]; then
  echo "error: requirements.txt: no 'jax==<version>' line to pin jax[cuda12] to" >&2
  exit 1
fi
PIP=${PIP:-python3 -m pip}
# Wheels for the GPU machine, whatever this machine is; binary only (nothing is built there).
TARGET=(--only-binary=:all: --python-version 3.11 --implementation cp --abi cp311
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux_2_24_x86_64 --platform manylinux_2_27_x86_64
        --platform manylinux_2_28_x86_64)
REQUIREMENTS=(-r requirements.txt "jax[cuda12]==${JAX_VERSION}")
# Dependencies published as source only (tensorflow-datasets needs promise): pure Python, so a
# wheel built here installs anywhere; the download below then finds it in --find-links.
SOURCE_ONLY=(promise==2.3)

build_source_only() {  # $1: folder for the wheels
  ${PIP} wheel --quiet --no-deps --wheel-dir "$1" "${SOURCE_ONLY[@]}"
}

case "${1:-}" in
  --check)
    scratch=$(mktemp -d)
    trap 'rm -rf "${scratch}"' EXIT
    build_source_only "${scratch}/wheels"
    ${PIP} install --dry-run --quiet --ignore-installed --target "${scratch}/target" \
      --report "${scratch}/report.json" --find-links "${scratch}/wheels" "${TARGET[@]}" \
      "${REQUIREMENTS[@]}"
    python3 - "${scratch}/report.json" <<'PY'
import json, sys
items = json.load(open(sys.argv[1]))["install"]
for item in sorted(items, key=lambda i: i["metadata"]["name"].lower()):
  print(f"{item['metadata']['name']}=={item['metadata']['version']}  {item['download_info']['url'].rsplit('/', 1)[-1]}")
print(f"{len(items)} wheels would be downloaded")
PY
    ;;
  "")
    mkdir -p "${DEST}"
    build_source_only "${DEST}"
    ${PIP} download --dest "${DEST}" --find-links "${DEST}" "${TARGET[@]}" "${REQUIREMENTS[@]}"
    count=$(ls "${DEST}"/*.whl | wc -l)
    echo "${count} wheels in ${DEST} ($(du -sh "${DEST}" | cut -f1)); next, on the GPU machine:" \
         "benchmarks/gpu/run.sh"
    ;;
  *)
    echo "error: unknown argument '$1'; expected nothing or --check" >&2
    exit 2
    ;;
esac
