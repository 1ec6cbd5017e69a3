#!/usr/bin/env bash
# Training-step throughput of xtf-train vs PyTorch eager (+PEFT) on this CPU,
# same model, batch and step, run side by side; prints the speed ratio.
#
#   bash scripts/bench_compare.sh [STEPS]        (needs: pip install -r scripts/requirements.txt)
#
# Run on an otherwise idle machine: both sides use every core.
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-5}
py=${PYTHON:-python3}
cargo build --release --bench train_step -q 2>/dev/null || cargo bench --bench train_step --no-run -q
for method in lora full; do
  ours=$(cargo bench -q --bench train_step -- --method "$method" --steps "$steps" 2>/dev/null | tail -n 1)
  theirs=$("$py" scripts/bench_torch.py --method "$method" --steps "$steps" 2>/dev/null | tail -n 1)
  "$py" - "$ours" "$theirs" <<'PY'
import json, sys
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"{a['method']:>4}: xtf-train {a['tokens_per_s']:8.0f} tok/s {a['peak_rss_mib']:7.0f} MiB | "
      f"torch {b['tokens_per_s']:8.0f} tok/s {b['peak_rss_mib']:7.0f} MiB | "
      f"speed ratio (xtf/torch) {a['tokens_per_s'] / b['tokens_per_s']:.2f}x")
PY
done
