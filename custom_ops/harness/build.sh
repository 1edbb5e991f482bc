#!/usr/bin/env bash
# Builds the standalone GPU kernel library for the harness, without
# TensorFlow: every custom_ops/kernels/*.cu.cc (the same CUDA sources the TF
# op library links: ragged attention, id validation, the fused
# cross-entropy tile engine and CCEMinus, the kernel sampler's draws) plus
# the C ABI shims custom_ops/harness/*.cc (ragged_attention_capi.cc,
# cross_entropy_capi.cc, kernel_sampler_capi.cc), into
#
#     custom_ops/harness/build/libtfrec_fast_kernels.so
#
# which ragged_attention.py, cross_entropy.py and kernel_sampler.py load with
# ctypes.
# Usage:  custom_ops/harness/build.sh
# Environment:
#   NVCC         nvcc to use (default: nvcc on PATH, else /usr/local/cuda).
#                Any CUDA 12 or 13 toolkit; it should match the CUDA runtime of
#                the PyTorch the harness runs with only in major version if
#                the runtime is linked shared (the default links it static).
#   CUDA_ARCHS   e.g. "90" (default), "80;90", "90a"; SASS for each, plus PTX
#                of the last for newer GPUs.
#   OUT_DIR      output folder (default custom_ops/harness/build).
#   CUDART       static (default) or shared.
#   EXTRA_NVCC_FLAGS  appended to every nvcc call (e.g. "-G" for cuda-gdb).
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
NVCC="${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
ARCHS="${CUDA_ARCHS:-90}"
OUT_DIR="${OUT_DIR:-$HERE/build}"
CUDART="${CUDART:-static}"
read -r -a EXTRA <<<"${EXTRA_NVCC_FLAGS:-}"

if [ ! -x "$NVCC" ]; then
  echo "build.sh: no nvcc found (set NVCC)" >&2
  exit 1
fi

GENCODE=()
IFS=';' read -r -a ARCH_LIST <<<"$ARCHS"
for arch in "${ARCH_LIST[@]}"; do
  [ -n "$arch" ] && GENCODE+=("-gencode=arch=compute_${arch},code=sm_${arch}")
done
last="${ARCH_LIST[${#ARCH_LIST[@]}-1]}"
GENCODE+=("-gencode=arch=compute_${last},code=compute_${last}")

COMMON=(-std=c++17 -O3 -I"$ROOT" -Xcompiler -fPIC,-Wall,-Wextra
        --expt-relaxed-constexpr -lineinfo "${EXTRA[@]}")

mkdir -p "$OUT_DIR/obj"
echo "build.sh: $("$NVCC" --version | tail -n 2 | head -n 1)" >&2
echo "build.sh: archs $ARCHS, cudart $CUDART -> $OUT_DIR" >&2

objects=()
pids=()
for src in "$ROOT"/custom_ops/kernels/*.cu.cc; do
  obj="$OUT_DIR/obj/$(basename "$src" .cu.cc).cu.o"
  "$NVCC" -x cu -c "$src" -o "$obj" "${GENCODE[@]}" "${COMMON[@]}" &
  pids+=($!)
  objects+=("$obj")
done
for src in "$HERE"/*.cc; do
  obj="$OUT_DIR/obj/$(basename "$src" .cc).o"
  "$NVCC" -x c++ -c "$src" -o "$obj" "${COMMON[@]}" &
  pids+=($!)
  objects+=("$obj")
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
if [ "$status" -ne 0 ]; then
  echo "build.sh: compilation failed" >&2
  exit 1
fi

"$NVCC" -shared -cudart "$CUDART" "${GENCODE[@]}" -o \
  "$OUT_DIR/libtfrec_fast_kernels.so" "${objects[@]}"
echo "$OUT_DIR/libtfrec_fast_kernels.so"
