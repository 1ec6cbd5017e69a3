#!/usr/bin/env bash
# Data-parallel scaling on this machine: the tiny default's model and data,
# the same global batch (16 sequences of up to 256 tokens per step), as
#   1 rank  x 2 threads (micro_batch_size 16)
#   2 ranks x 1 thread  (micro_batch_size 8, mpirun -np 2)
# alternating, ROUNDS rounds (default 3). Prints tokens/s of each, the
# scaling efficiency (2-rank tok/s over 1-rank tok/s; 1.0 = as fast on the
# same cores) and the time rank 0 spent in collectives per step.
# Needs Open MPI and a build with the `mpi` feature (built here).
#
#   bash scripts/bench_dist.sh [ROUNDS] [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
steps=${2:-20}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
cargo build --release --features mpi -q
bin=target/release/xtf-train
[ -f runs/tiny/model/model.safetensors ] || "$bin" init-tiny --out runs/tiny
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for mbs in 16 8; do
  cat > "$work/mbs$mbs.toml" <<TOML
[model]
path = "runs/tiny/model"
[data]
train = "runs/tiny/data/train.jsonl"
template = "Question: {prompt}\nAnswer: "
max_seq_len = 256
[train]
max_steps = $steps
micro_batch_size = $mbs
lr = 1e-3
[output]
dir = "$work/out$mbs"
TOML
done
tps() { grep -o 'done: .*' "$1" | grep -o '[0-9]* tok/s' | grep -o '^[0-9]*'; }
for r in $(seq 1 "$rounds"); do
  RAYON_NUM_THREADS=2 "$bin" --config "$work/mbs16.toml" --quiet >"$work/one.log" 2>&1
  RAYON_NUM_THREADS=1 mpirun -np 2 "$bin" --config "$work/mbs8.toml" --quiet >"$work/two.log" 2>&1
  one=$(tps "$work/one.log"); two=$(tps "$work/two.log")
  comm=$(grep -o 'communication: .*' "$work/two.log" || echo "communication: ?")
  python3 -c "import sys; o,t=map(float,sys.argv[1:3]); print(f'round $r: 1 rank x 2 threads {o:7.0f} tok/s | 2 ranks x 1 thread {t:7.0f} tok/s | efficiency {t/o:.2f} | {sys.argv[3]}')" "$one" "$two" "$comm"
done
