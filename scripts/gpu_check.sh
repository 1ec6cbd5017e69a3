#!/usr/bin/env bash
# One-shot check of xtf-train on a CUDA machine, offline, in under 8 minutes:
#   1. build with --features cuda,nccl (CUDA_COMPUTE_CAP from nvidia-smi if unset)
#   2. parity (incl. the bf16 bound), gradient / accumulation and packing
#      tests on the GPU (XTF_TEST_DEVICE=cuda, the CPU tolerances)
#   3. a 20-step LoRA run of the tiny default on cuda (XTF scoring pass,
#      training, eval), then the scoring pass alone, then every tensor
#      collective through a one-rank NCCL communicator (dist-selftest)
#   4. the training benchmark on a Llama-3.2-1B-shaped model with random
#      weights, bf16, seq 2048: tokens/s, peak GPU memory, MFU
# and writes runs/gpu_check/summary.md.
#
#   bash scripts/gpu_check.sh              # on a CUDA machine
#   bash scripts/gpu_check.sh --dry-run    # anywhere: CPU, tiny sizes, same stages
#   XTF_GPU_CHECK_DEVICE=cpu bash scripts/gpu_check.sh   # same as --dry-run
#   bash scripts/gpu_check.sh --prebuilt target/gpu-bundle.tar.xz
#       # a CUDA machine without Rust: the binaries scripts/gpu_bundle.sh
#       # built elsewhere (stage 1 unpacks instead of building)
#
# Environment: CUDA_COMPUTE_CAP (e.g. 90), XTF_PEAK_TFLOPS (the card's dense
# bf16 peak; default from the table below by GPU name), XTF_GPU_CHECK_ONLINE=1
# (let cargo reach the registry; default --offline), XTF_GPU_CHECK_OUT
# (default runs/gpu_check). Exit status: 0 iff every stage passed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TERM_COLOR=never HF_HUB_OFFLINE=1

device=${XTF_GPU_CHECK_DEVICE:-cuda}
prebuilt=
while (($#)); do
  case $1 in
    --dry-run) device=cpu ;;
    --prebuilt) prebuilt=$(realpath "${2:?--prebuilt needs a bundle}"); shift ;;
    *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
out=${XTF_GPU_CHECK_OUT:-runs/gpu_check}
rm -rf "$out"
mkdir -p "$out"
log="$out/log.txt"
: >"$log"
offline=--offline
[[ "${XTF_GPU_CHECK_ONLINE:-0}" == 1 ]] && offline=

if [[ $device == cpu ]]; then
  features=()
  bench_args=(--size tiny --dtype f32 --device cpu --batch 2 --seq 64 --steps 2 --warmup 1)
  gpu_name="none (dry run on CPU)"
else
  features=(--features cuda,nccl)
  bench_args=(--size 1b --dtype bf16 --device "$device" --batch 1 --seq 2048 --steps 4 --warmup 2)
  gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
  if [[ -z "${CUDA_COMPUTE_CAP:-}" ]]; then
    CUDA_COMPUTE_CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '.')
    export CUDA_COMPUTE_CAP
  fi
fi

# Dense bf16 peak (TFLOP/s, no sparsity) by card name; XTF_PEAK_TFLOPS wins.
peak=${XTF_PEAK_TFLOPS:-}
if [[ -z $peak ]]; then
  case "$gpu_name" in
    *H200*) peak=989 ;;
    *H100*PCIe*) peak=756 ;;
    *H100*NVL*) peak=835 ;;
    *H100*) peak=989 ;;
    *A100*) peak=312 ;;
    *) peak= ;;
  esac
fi
export XTF_PEAK_TFLOPS=$peak

declare -a rows
failed=0
# stage NAME LIMIT_S CMD...: run with a time limit, log, record the outcome.
stage() {
  local name=$1 limit=$2
  shift 2
  echo "=== $name: $*" | tee -a "$log"
  local t0=$SECONDS rc
  # A shell function applies the limit itself (timeout runs programs only).
  if declare -F "$1" >/dev/null; then
    LIMIT=$limit "$@" >>"$log" 2>&1
  else
    timeout --signal=INT --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  fi
  rc=$?
  local dt=$((SECONDS - t0)) status=ok
  if ((rc != 0)); then
    status="FAILED (exit $rc$( ((rc == 124)) && echo ", over ${limit}s"))"
    failed=1
  fi
  echo "=== $name: $status in ${dt}s" | tee -a "$log"
  rows+=("| $name | $status | $dt |")
}

# Sample GPU memory in use every 100 ms while a command runs; the peak in MiB
# lands in $out/$1.peak.
with_gpu_peak() {
  local tag=$1
  shift
  local smi_pid=
  if command -v nvidia-smi >/dev/null 2>&1 && [[ $device != cpu ]]; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$out/$tag.smi" 2>/dev/null &
    smi_pid=$!
  fi
  "$@"
  local rc=$?
  if [[ -n $smi_pid ]]; then
    kill "$smi_pid" 2>/dev/null
    wait "$smi_pid" 2>/dev/null
    sort -n "$out/$tag.smi" | tail -1 >"$out/$tag.peak"
  fi
  return $rc
}

# 1. Build once; the test and bench binaries reuse the artefacts. With
#    --prebuilt, unpack scripts/gpu_bundle.sh's binaries instead, and find
#    the CUDA libraries they link (cuBLAS, cuRAND, NVRTC 13) in the system
#    or in the Python packages of the machine's image.
if [[ -n $prebuilt ]]; then
  bundle=$out/bundle
  unpack() {
    mkdir -p "$bundle" && tar -xJf "$prebuilt" -C "$bundle" && ls -l "$bundle"
    if ! ldconfig -p 2>/dev/null | grep -q 'libcublas.so.13' || ! ldconfig -p 2>/dev/null | grep -q 'libnccl.so.2'; then
      local d
      for d in /usr/local/cuda/lib64 $(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null); do
        [[ -d $d ]] || continue
        while read -r lib; do
          LD_LIBRARY_PATH="$(dirname "$lib")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        done < <(find "$d" -maxdepth 4 \( -name 'lib*.so.1[0-3]' -o -name 'libnccl.so.2' \) \( -name 'libcublas.so.*' -o -name 'libcurand.so.*' -o -name 'libnvrtc.so.*' -o -name 'libcudart.so.*' -o -name 'libnccl.so.2' \) 2>/dev/null)
      done
      export LD_LIBRARY_PATH
    fi
    echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
    ldd "$bundle/xtf-train" | grep -E 'cu|nvrtc|not found'
    ! ldd "$bundle/xtf-train" | grep -q 'not found'
  }
  stage unpack 60 unpack
  bin=$bundle/xtf-train
  bench=$bundle/train_step
  export CARGO_MANIFEST_DIR=$PWD # the test binaries read tests/fixtures from here
  model_tests() {
    timeout --signal=INT "$LIMIT" "$bundle/integration" --nocapture parity:: grad:: packing:: quant::quantised_matmul
  }
else
  stage build 330 cargo build --release $offline "${features[@]}" --bin xtf-train --bench train_step
  stage build-tests 120 cargo test --release $offline "${features[@]}" --no-run \
    --test integration
  bin=target/release/xtf-train
  bench=$(ls -t target/release/deps/train_step-* 2>/dev/null | grep -v '\.d$' | head -1)
  model_tests() {
    timeout --signal=INT "$LIMIT" cargo test --release $offline "${features[@]}" \
      --test integration -- --nocapture parity:: grad:: packing:: quant::quantised_matmul
  }
fi

# 2. Model tests on the device, CPU tolerances.
export XTF_TEST_DEVICE=$device
stage tests 120 model_tests
unset XTF_TEST_DEVICE
grep -E "^test result:|^test .*FAILED|bf16: max" "$log" >"$out/tests.txt"

# 3. The tiny default, 20 LoRA steps on the device, then the scoring pass alone.
cfg="$out/tiny.toml"
sed -e "s/^device = \"cpu\"/device = \"$device\"/" \
  -e "s|^dir = \"runs/tiny/out\"|dir = \"$out/tiny-out\"|" \
  -e 's/^\[train\]$/[train]\nmax_steps = 20/' \
  -e 's/^eval_steps = 10/eval_steps = 20/' configs/tiny.toml >"$cfg"
stage tiny-run 150 "$bin" --config "$cfg" --quiet
stage tiny-score 60 "$bin" score --config "$cfg" --rescore --quiet
# LoRA on a Q4_0 base (model.quantize): block weights on the device,
# dequantised per product by candle's CUDA kernels.
sed -e 's/^\[model\]$/[model]\nquantize = "q4_0"/' \
  -e "s|^dir = \"$out/tiny-out\"|dir = \"$out/tiny-q4-out\"|" "$cfg" >"$out/tiny-q4.toml"
stage tiny-q4 150 "$bin" --config "$out/tiny-q4.toml" --quiet
# NCCL on the device: every tensor collective through a one-rank
# communicator (the multi-rank runs need several GPUs; docs/distributed.md).
[[ $device == cpu ]] || stage nccl-selftest 60 "$bin" dist-selftest --device "$device"

# 4. Training benchmark: LoRA, LoRA with gradient checkpointing, full FT.
bench_run() {
  local tag=$1
  shift
  with_gpu_peak "$tag" timeout --signal=INT --kill-after=10 "$LIMIT" \
    "$bench" "${bench_args[@]}" "$@" >"$out/$tag.json"
}
stage bench-lora 120 bench_run bench-lora --method lora
stage bench-lora-ckpt 120 bench_run bench-lora-ckpt --method lora --checkpointing
stage bench-full 120 bench_run bench-full --method full

# The summary.
# json TAG KEY [PRINTF_FORMAT]: one value of a benchmark's JSON line.
json() {
  local v
  v=$(sed -nE "s/.*\"$2\":([^,}]*).*/\1/p" "$out/$1.json" 2>/dev/null | head -1)
  [[ $v == null ]] && v=
  if [[ -n ${3:-} && $v =~ ^[0-9.eE+-]+$ ]]; then printf "$3" "$v"; else echo "${v:-n/a}"; fi
}
{
  echo "# gpu_check summary"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null) $(git diff --quiet 2>/dev/null || echo '(dirty)')"
  echo "- device: $device; GPU: $gpu_name; CUDA_COMPUTE_CAP: ${CUDA_COMPUTE_CAP:-n/a}; bf16 peak: ${peak:-unknown} TFLOP/s"
  echo
  echo "| stage | status | seconds |"
  echo "|---|---|---|"
  printf '%s\n' "${rows[@]}"
  echo
  echo "## Tests (XTF_TEST_DEVICE=$device)"
  echo
  echo '```'
  cat "$out/tests.txt"
  echo '```'
  echo
  echo "## Tiny default, 20 LoRA steps"
  echo
  echo '```'
  sed -E 's/\x1b\[[0-9;]*m//g' "$log" | grep -E "memory plan|the estimate|free of|scoring pass|done:|task +problems|gsm8k +[0-9]" |
    sed -E 's/^[0-9TZ:.-]+ +(INFO|WARN) //' | head -12
  echo '```'
  echo
  echo "## Training benchmark (${bench_args[*]})"
  echo
  echo "| run | tokens/s | step ms | peak GPU MiB (nvidia-smi) | GPU MiB in use (in-process) | estimate MiB | peak RSS MiB | MFU |"
  echo "|---|---|---|---|---|---|---|---|"
  for tag in bench-lora bench-lora-ckpt bench-full; do
    [[ -s "$out/$tag.json" ]] || { echo "| $tag | (no result) | | | | | | |"; continue; }
    echo "| $tag | $(json $tag tokens_per_s %.0f) | $(json $tag step_ms %.1f) | $(cat "$out/$tag.peak" 2>/dev/null || echo n/a) | $(json $tag peak_gpu_mib %.0f) | $(json $tag estimate_mib %.0f) | $(json $tag peak_rss_mib %.0f) | $(json $tag mfu %.3f) |"
  done
  echo
  echo "MFU = (6·N·tokens + 12·L·heads·head_dim·T·tokens) / step time / bf16 peak,"
  echo "N = matmul parameters; for LoRA this is the conventional figure (frozen"
  echo "weights skip their weight gradients). Raw JSON: \`$out/bench-*.json\`; full log: \`$log\`."
} >"$out/summary.md"
echo "summary: $out/summary.md"
cat "$out/summary.md"
exit $failed
