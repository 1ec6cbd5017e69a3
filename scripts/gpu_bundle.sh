#!/usr/bin/env bash
# Build, on a machine with no GPU, the CUDA binaries scripts/gpu_check.sh
# needs, for a CUDA machine that has no Rust toolchain and no network (the
# project's device machines): xtf-train, the training benchmark and the
# integration test binary (its parity / grad / packing modules are what
# gpu_check.sh runs), stripped, in one archive
#
#   bash scripts/gpu_bundle.sh [OUT]      # default target/gpu-bundle.tar.xz
#
# then, on the CUDA machine, from a checkout of the same commit:
#
#   bash scripts/gpu_check.sh --prebuilt target/gpu-bundle.tar.xz
#
# The toolkit comes from scripts/cuda-env.sh (CUDA 13.0 wheels, the version
# the device image's driver runs); the build shares .ci/run's target/cuda,
# so after CI-style builds only the test binaries are new. The binaries
# need glibc no newer than this machine's and the CUDA 13 libraries there.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/gpu-bundle.tar.xz}
# shellcheck disable=SC1091
source scripts/cuda-env.sh
export CARGO_TARGET_DIR=target/cuda CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-2}
cargo build --release --features cuda,nccl --bin xtf-train --bench train_step
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
cp target/cuda/release/xtf-train "$stage/"
# The executables cargo reports, by target name.
cargo test --release --features cuda,nccl --no-run --message-format=json \
  --test integration --bench train_step |
  python3 -c '
import json, shutil, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        shutil.copy(m["executable"], sys.argv[1] + "/" + m["target"]["name"])
' "$stage"
for f in xtf-train train_step integration; do
  [[ -x "$stage/$f" ]] || { echo "gpu_bundle.sh: $f was not built" >&2; exit 1; }
  strip "$stage/$f"
done
mkdir -p "$(dirname "$out")"
tar -cJf "$out.tmp" -C "$stage" .
mv "$out.tmp" "$out"
echo "$out: $(du -h "$out" | cut -f1) ($(git rev-parse --short HEAD)$(git diff --quiet || echo ', dirty'))"
