#!/usr/bin/env bash
# LoRA on SmolLM2-135M-Instruct (../shared/models, Q4_1 projections, Q8_0
# tied embedding) with the base held dense in f32 (model.quantize = "none":
# the GGUF dequantised at load) and kept as stored ("keep"), side by side,
# alternating, ROUNDS rounds (default 3): the XTF scoring pass (64 GSM8K
# problems) and STEPS LoRA steps (default 6) of 4 × 2 sequences of up to 512
# tokens on the CPU. Prints per round and config: base weight MiB, scoring
# tok/s, mean training tok/s over the steps after the first, peak RSS, and
# the losses (which must agree: the same weights, dequantised once or band
# by band). Needs ../shared/models and ../shared/data.
#
#   bash scripts/bench_quant.sh [ROUNDS] [STEPS]
#   CKPT=1 bash scripts/bench_quant.sh ...     # with train.gradient_checkpointing = true
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
steps=${2:-6}
shared=$(cd .. && pwd)/shared
gguf=$shared/models/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$gguf" ] || { echo "skipping: $gguf not present"; exit 0; }
cargo build --release -q
bin=target/release/xtf-train
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for q in none keep; do
  cat > "$work/$q.toml" <<TOML
[model]
path = "$gguf"
quantize = "$q"
[data]
train = "$shared/data/gsm8k/train.jsonl"
prompt_field = "question"
response_field = "answer"
chat_template = true
limit = 64
max_seq_len = 512
[train]
micro_batch_size = 4
grad_accum = 2
lr = 2e-4
max_steps = $steps
log_steps = 1
gradient_checkpointing = $([ -n "${CKPT:-}" ] && echo true || echo false)
seed = 1
[lora]
r = 8
target_modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
[output]
dir = "$work/out-$q"
[xtf]
enabled = true
batch_size = 8
TOML
done
# Convert the GGUF for "none" once, outside the measured runs.
"$bin" --config "$work/none.toml" --quiet >/dev/null 2>&1 || true
for r in $(seq 1 "$rounds"); do
  for q in none keep; do
    rm -rf "$work/out-$q"
    /usr/bin/time -f 'peak_rss_kb %M' "$bin" --config "$work/$q.toml" --quiet >"$work/$q.log" 2>&1
    python3 - "$work/$q.log" "$r" "$q" <<'PY'
import re, sys
log, r, q = open(sys.argv[1]).read(), sys.argv[2], sys.argv[3]
base = re.search(r'base weights: (\S+ \S+)', log)
base = base.group(1) if base else "dense (f32)"
score = re.search(r'scoring pass: .*?\(([0-9.]+) tok/s', log).group(1)
steps = [float(x) for x in re.findall(r'step +\d+/\d+ \| loss .*?\| +([0-9.]+) tok/s', log)]
losses = re.findall(r'step +\d+/\d+ \| loss ([0-9.]+)', log)
train = sum(steps[1:]) / max(len(steps) - 1, 1)
rss = int(re.search(r'peak_rss_kb (\d+)', log).group(1)) / 2**20
print(f"round {r} {q:>4}: base {base:>9} | scoring {float(score):5.0f} tok/s | "
      f"training {train:5.0f} tok/s | peak RSS {rss:.2f} GiB | losses {' '.join(losses)}")
PY
  done
done
