#!/usr/bin/env bash
# Training-step throughput of xtf-train vs PyTorch eager (+PEFT) on this CPU,
# same model, batch and step, run side by side; prints the speed ratio.
#
#   bash scripts/bench_compare.sh [STEPS] [ROUNDS]   (needs: pip install -r scripts/requirements.txt)
#
# Each round runs, for both sizes (bench: hidden 512, batch 4 x 256; tiny: the
# embedded default's shape, batch 8 x 256 as configs/tiny.toml) and both
# methods (LoRA, full), our step and then PyTorch's, one process each, so the
# two sides of a ratio are measured minutes apart on the same machine.
# Last, both sides' matmul GFLOP/s on the bench model's shapes
# (benches/matmul.rs, bench_torch.py --matmul): the ceiling of the step.
# Run on an otherwise idle machine: both sides use every core.
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-5}
rounds=${2:-1}
py=${PYTHON:-python3}
cargo bench --bench train_step --no-run -q
cargo bench --bench matmul --no-run -q
for round in $(seq 1 "$rounds"); do
  for size in bench tiny; do
    if [ "$size" = tiny ]; then shape=(--batch 8 --seq 256); else shape=(--batch 4 --seq 256); fi
    for method in lora full; do
      args=(--method "$method" --size "$size" "${shape[@]}" --steps "$steps")
      ours=$(cargo bench -q --bench train_step -- "${args[@]}" 2>/dev/null | tail -n 1)
      theirs=$("$py" scripts/bench_torch.py "${args[@]}" 2>/dev/null | tail -n 1)
      "$py" - "$round" "$size" "$ours" "$theirs" <<'PY'
import json, sys
r, size, a, b = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
print(f"round {r} {size:>5} {a['method']:>4}: xtf-train {a['tokens_per_s']:8.0f} tok/s {a['peak_rss_mib']:7.0f} MiB | "
      f"torch {b['tokens_per_s']:8.0f} tok/s {b['peak_rss_mib']:7.0f} MiB | "
      f"speed ratio (xtf/torch) {a['tokens_per_s'] / b['tokens_per_s']:.2f}x", flush=True)
PY
    done
  done
done
# The ceiling both sides work under: matmul GFLOP/s on the bench model's shapes.
cargo bench -q --bench matmul 2>/dev/null > "${TMPDIR:-/tmp}/xtf_matmul_ours.jsonl"
"$py" scripts/bench_torch.py --matmul 2>/dev/null > "${TMPDIR:-/tmp}/xtf_matmul_torch.jsonl"
"$py" - "${TMPDIR:-/tmp}/xtf_matmul_ours.jsonl" "${TMPDIR:-/tmp}/xtf_matmul_torch.jsonl" <<'PY'
import json, sys
ours = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
theirs = [json.loads(l) for l in open(sys.argv[2]) if l.strip()]
for a, b in zip(ours, theirs):
    print(f"matmul {a['m']}x{a['k']}x{a['n']}: xtf-train (gemm) {a['gflops']:6.1f} GFLOP/s | "
          f"torch {b['gflops']:6.1f} GFLOP/s | ratio {a['gflops'] / b['gflops']:.2f}x", flush=True)
PY
