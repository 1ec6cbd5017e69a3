#!/usr/bin/env bash
# Normal fine-tuning vs XTF ("paper" rules) vs XTF ("authors" preset) on a
# real pre-trained model, SmolLM2-135M-Instruct (GGUF, ../shared/models), on
# real GSM8K problems (../shared/data), on CPU (docs/real_model.md).
#
#   scripts/real_model_experiment.sh
#
# Metric: held-out answer loss — the mean cross-entropy over every answer
# token (the chat template's end-of-turn included, nothing masked) of the
# first N_EVAL GSM8K *test* problems after LoRA fine-tuning on the first
# N_TRAIN training problems. A 135M model solves ~1-3% of GSM8K, so held-out
# accuracy on a few dozen problems cannot separate the arms; the answer loss
# is continuous and measured on problems no arm saw. Nothing is tuned on it:
# every arm uses its documented defaults.
#
# Environment (defaults in brackets):
#   OUT      output directory [runs/real_model]
#   SEEDS    training seeds [1 2 3]
#   ARMS     arms [normal paper authors]
#   N        training and held-out problems (data.limit) [20]
#   EPOCHS   epochs over the training problems [2]
#   LR       LoRA learning rate (a few steps only, so larger than the
#            config's 2e-4) [1e-3]
#   XTF_BIN  use this binary instead of building one
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/real_model}
SEEDS=${SEEDS:-1 2 3}
ARMS=${ARMS:-normal paper authors}
N=${N:-20}
EPOCHS=${EPOCHS:-2}
LR=${LR:-1e-3}
for f in ../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf ../shared/data/gsm8k/train.jsonl; do
    [[ -f $f ]] || { echo "skipping: $f not present" >&2; exit 0; }
done
if [[ -z "${XTF_BIN:-}" ]]; then
    cargo build --release --quiet
    XTF_BIN=target/release/xtf-train
fi
mkdir -p "$OUT/configs"
started=$(date +%s)
for seed in $SEEDS; do
    for arm in $ARMS; do
        cfg="$OUT/configs/$arm-s$seed.toml"
        python3 - configs/smollm2-gsm8k.toml "$cfg" "$arm" "$seed" "$OUT/$arm-s$seed" "$N" "$EPOCHS" "$LR" <<'PY'
import re, sys
src, dst, arm, seed, out, n, epochs, lr = sys.argv[1:]
s = open(src).read()
def sub(pattern, repl):
    global s
    s, k = re.subn(pattern, repl, s, count=1, flags=re.M)
    assert k == 1, pattern
sub(r"^limit = \d+", f"limit = {n}")
sub(r"^epochs = \d+", f"epochs = {epochs}")
sub(r"^seed = \d+", f"seed = {seed}")
sub(r"^lr = .*", f"lr = {lr}")
sub(r"^eval_steps = \d+\n", "")
sub(r'^dir = ".*"', f'dir = "{out}"')
head, sep, _ = s.partition("\n[xtf]\n")
assert sep
if arm == "normal":
    s = head
elif arm == "paper":
    s = head + "\n[xtf]\nenabled = true\npreset = \"paper\"\nbatch_size = 8\n"
elif arm != "authors":
    sys.exit(f"unknown arm {arm}")
open(dst, "w").write(s)
PY
        if [[ -f "$OUT/$arm-s$seed/metrics.jsonl" ]] && cmp -s "$cfg" "$OUT/$arm-s$seed/config.toml"; then
            continue
        fi
        # The scores depend on the arm's XTF settings, not on the seed.
        for c in "$OUT/$arm"-s*/xtf_scores.safetensors; do
            [[ -f $c ]] || continue
            mkdir -p "$OUT/$arm-s$seed"
            cp "$c" "$OUT/$arm-s$seed/" 2>/dev/null || true
            break
        done
        echo "== $arm seed $seed" >&2
        t0=$(date +%s)
        "$XTF_BIN" --config "$cfg" --quiet 2>"$OUT/$arm-s$seed.log" || { tail -5 "$OUT/$arm-s$seed.log" >&2; exit 1; }
        echo $(($(date +%s) - t0)) >"$OUT/$arm-s$seed/wall_s"
        cp "$cfg" "$OUT/$arm-s$seed/config.toml"
    done
done
total=$(($(date +%s) - started))
python3 - "$OUT" "$SEEDS" "$ARMS" "$total" "$N" "$EPOCHS" "$LR" <<'PY' | tee "$OUT/results.md"
import json, os, statistics, sys
out, seeds, arms, total, n, epochs, lr = sys.argv[1], sys.argv[2].split(), sys.argv[3].split(), int(sys.argv[4]), sys.argv[5], sys.argv[6], sys.argv[7]
def ms(xs):
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}" if len(xs) > 1 else f"{xs[0]:.4f}"
def lines(arm, s):
    return [json.loads(l) for l in open(os.path.join(out, f"{arm}-s{s}", "metrics.jsonl")) if l.strip()]
print(f"SmolLM2-135M-Instruct (GGUF Q4_1, f32), LoRA r 8 on all 7 projections, first {n} GSM8K train "
      f"problems x {epochs} epochs (micro-batch 4 x accumulation 2, lr {lr}, cosine), held-out answer loss over the first {n} GSM8K test problems. "
      f"Seeds {' '.join(seeds)}. Wall time of this invocation: {total} s.")
print()
print("| arm | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd | masked share | final train loss | wall s / run |")
print("|---|" + "---|" * len(seeds) + "---|---|---|---|")
for a in arms:
    ev = [lines(a, s)[-1]["eval_loss"] for s in seeds]
    tl = [lines(a, s)[-1]["loss"] for s in seeds]
    wall = [int(open(os.path.join(out, f"{a}-s{s}", "wall_s")).read()) for s in seeds]
    sm = os.path.join(out, f"{a}-s{seeds[0]}", "xtf_summary.json")
    masked = f"{json.load(open(sm))['masked_share']:.3f}" if os.path.exists(sm) else "0"
    print(f"| {a} | " + " | ".join(f"{x:.4f}" for x in ev) + f" | {ms(ev)} | {masked} | {ms(tl)} | {statistics.mean(wall):.0f} |")
PY
