#!/usr/bin/env bash
# Build-only CUDA 13.0 toolkit for `cargo build --features cuda` (candle 0.11 /
# cudarc 0.19) on a machine with no GPU and no NVIDIA driver, from NVIDIA's
# PyPI wheels only. Idempotent: a stamp file makes reruns a no-op (~0 s).
#
# Usage:   source scripts/cuda-env.sh   (installs if needed, then exports env)
#     then cargo build --release --features cuda
# Used by .ci/run to prove the CUDA path compiles; on a GPU machine with its
# own toolkit this script is not needed (docs/gpu.md).
#
# Pins: CUDA 13.0 (nvcc 13.0.88 -> PTX ISA 9.0). Matches the H200 device image
# (driver 580.x = CUDA 13.0, nvcc 13.0, torch cu130 => libcublas.so.13 etc.).
# A newer nvcc (13.1+) emits PTX a 580 driver cannot JIT; CUDA 12 wheels would
# make the binary need libcublas.so.12, which the device image does not have.

XTF_CUDA_DIR=${XTF_CUDA_DIR:-$HOME/.cache/xtf-cuda}
_xtf_root=$XTF_CUDA_DIR/cuda-13.0
_xtf_stamp=$_xtf_root/.xtf-complete-v2

_xtf_install() (   # subshell: strict mode does not leak into a sourcing shell
  set -euo pipefail
  local wheels=$XTF_CUDA_DIR/wheels-13.0 tmp root f
  mkdir -p "$wheels"
  if ! command -v unzip >/dev/null 2>&1; then   # keeps nvcc's exec bits, unlike zipfile
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq unzip >/dev/null
  fi
  # pip skips files already in $wheels; --no-deps keeps transitive pins exact.
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --no-cache-dir \
    --only-binary=:all: --python-version 3.11 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_18_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_12_x86_64 \
    --platform manylinux2010_x86_64 -d "$wheels" \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 \
    nvidia-cuda-nvrtc==13.0.88 nvidia-curand==10.4.0.35 nvidia-cublas==13.1.0.3 \
    nvidia-nccl-cu13==2.32.6
  tmp=$(mktemp -d "$XTF_CUDA_DIR/tmp.XXXXXX")
  for f in "$wheels"/*.whl; do
    case $f in
      */nvidia_nccl_*) ;;
      *) unzip -qo "$f" 'nvidia/cu13/*' -d "$tmp" ;;
    esac
  done
  root=$tmp/nvidia/cu13
  # NCCL (the `nccl` feature links -lnccl): the library only, from its wheel.
  unzip -qo "$wheels"/nvidia_nccl_cu13-*.whl 'nvidia/nccl/lib/libnccl.so.2' -d "$tmp"
  mv "$tmp/nvidia/nccl/lib/libnccl.so.2" "$root/lib/"
  ln -sfn lib "$root/lib64"                        # cudaforge/cudarc look in lib64
  ( cd "$root/lib"
    for l in cudart cublas cublasLt nvrtc; do ln -sf "lib$l.so.13" "lib$l.so"; done
    ln -sf libnccl.so.2 libnccl.so
    ln -sf libcurand.so.10 libcurand.so )
  # Stub libcuda (the driver API) -- candle-core enables cudarc's
  # `dynamic-linking`, so the final link needs -lcuda. Every entry point returns
  # CUDA_ERROR_STUB_LIBRARY (34); same soname as the real driver (libcuda.so.1).
  mkdir -p "$root/lib/stubs" "$root/nodriver"
  {
    gcc -E -P -x c "$root/include/cuda.h" \
      | grep -oE '\bCUresult\s+cu[A-Za-z0-9_]+\s*\(' | sed -E 's/CUresult\s+//; s/\s*\(//'
    # cudarc's bindings span several CUDA versions: add every name they declare.
    for f in "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs; do
      if [ -f "$f" ]; then
        grep -A1 'extern "C" {' "$f" | grep -oE '^\s+fn cu[A-Za-z0-9_]+' | awk '{print $2}' || true
      fi
    done
  } | grep -vxE 'cuGetErrorString|cuGetErrorName' | sort -u > "$root/lib/stubs/libcuda.syms"
  {
    echo 'static const char m[] = "CUDA_ERROR_STUB_LIBRARY: stub libcuda (no NVIDIA driver on this machine)";'
    echo 'int cuGetErrorString(int e, const char **s){ if (s) *s = m; return 0; }'
    echo 'int cuGetErrorName(int e, const char **s){ if (s) *s = "CUDA_ERROR_STUB_LIBRARY"; return 0; }'
    sed 's/.*/int &(void){ return 34; }/' "$root/lib/stubs/libcuda.syms"
  } > "$root/lib/stubs/libcuda_stub.c"
  gcc -shared -fPIC -O1 -Wl,-soname,libcuda.so.1 -o "$root/lib/stubs/libcuda.so" \
    "$root/lib/stubs/libcuda_stub.c"
  # Only for running on a driver-less machine (never put this dir on a GPU host's path).
  ln -sf ../lib/stubs/libcuda.so "$root/nodriver/libcuda.so.1"
  cat > "$root/env.sh" <<EOF
export CUDA_HOME="$_xtf_root" CUDA_PATH="$_xtf_root" CUDA_ROOT="$_xtf_root"
export NVCC="$_xtf_root/bin/nvcc" PATH="$_xtf_root/bin:\$PATH"
export CUDA_COMPUTE_CAP="\${CUDA_COMPUTE_CAP:-80}"
export LIBRARY_PATH="$_xtf_root/lib:$_xtf_root/lib/stubs\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
EOF
  rm -rf "$_xtf_root"; mv "$root" "$_xtf_root"; rm -rf "$tmp"
  [ -n "${XTF_CUDA_KEEP_WHEELS:-}" ] || rm -rf "$wheels"
  touch "$_xtf_stamp"
)

# Called outside any `||` / condition, so errexit holds inside the installer
# (a failed step never leaves a stamp behind).
if [ ! -f "$_xtf_stamp" ]; then
  _xtf_install
fi
[ -f "$_xtf_stamp" ] || return 1 2>/dev/null || exit 1
# shellcheck disable=SC1091
. "$_xtf_root/env.sh"
