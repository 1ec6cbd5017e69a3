#!/usr/bin/env bash
# Peak RSS of a short training run on the tiny default's data with and
# without one 50 MB record (issue 25: memory must follow max_seq_len, not a
# record's size). Side by side, ROUNDS rounds each (default 3); prints every
# round. Needs the tiny assets (`cargo run --release -- --config
# configs/tiny.toml` once, or `xtf-train init-tiny --out runs/tiny`).
#
#   bash scripts/bench_huge_record.sh [ROUNDS] [MB]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
mb=${2:-50}
bin=target/release/xtf-train
cargo build --release -q
[ -f runs/tiny/model/model.safetensors ] || "$bin" init-tiny --out runs/tiny
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp runs/tiny/data/train.jsonl "$work/plain.jsonl"
python3 - "$work" "$mb" <<'PY'
import json, sys
work, mb = sys.argv[1], int(sys.argv[2])
rows = open(f"{work}/plain.jsonl").read()
huge = json.dumps({"prompt": "What is 2+2?", "response": "The answer is 4. " * (mb * 2**20 // 17)})
open(f"{work}/huge.jsonl", "w").write(huge + "\n" + rows)
PY
for kind in plain huge; do
  cat > "$work/$kind.toml" <<TOML
[model]
path = "runs/tiny/model"
[data]
train = "$work/$kind.jsonl"
prompt_field = "prompt"
response_field = "response"
template = "Question: {prompt}\nAnswer: "
max_seq_len = 256
[train]
max_steps = 2
micro_batch_size = 8
[output]
dir = "$work/out-$kind"
TOML
done
echo "record: $(du -h "$work/huge.jsonl" | cut -f1) file ($mb MB response)"
for r in $(seq 1 "$rounds"); do
  for kind in plain huge; do
    /usr/bin/time -f "%M %e" -o "$work/time" "$bin" --config "$work/$kind.toml" --quiet >"$work/log" 2>&1
    read -r kib secs <"$work/time"
    cut=$(grep -o '[0-9]* records cut' "$work/log" || echo "0 records cut")
    printf 'round %d %-5s peak RSS %6.0f MiB  %5.1f s  (%s)\n' "$r" "$kind" "$((kib / 1024))" "$secs" "$cut"
  done
done
