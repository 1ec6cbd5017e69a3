#!/usr/bin/env python3
"""PyTorch eager CPU training benchmark: the reference counterpart of the
xtf-train (Rust/candle) training benchmark.

What: builds a randomly initialised Llama — --size bench (default): vocab
2048, hidden 512, intermediate 1376, 4 layers, 8 heads, 8 kv heads; --size
tiny: the embedded default's shape, vocab 512, hidden 128, intermediate 352,
4 layers, 4 heads, 2 kv heads, head_dim 32 — f32, eager attention or --attn
sdpa, and times training steps on random token ids (--batch 4, --seq 256).
The shapes are those of `cargo bench --bench train_step -- --size S`. One step = forward, causal-LM cross-entropy over all
positions (logits[:, :-1] vs ids[:, 1:]), backward, clip_grad_norm_(1.0),
AdamW(lr 1e-4).step(), zero_grad(). --method full trains all weights;
--method lora trains a PEFT LoRA (r=8, alpha=16, dropout 0, on q/k/v/o/gate/up/down)
with the base frozen. --warmup steps are run first and not timed.

Output: exactly ONE JSON line on stdout, e.g.
  {"impl":"torch","method":"lora","tokens_per_s":...,"step_ms":...,"peak_rss_mib":...,
   "threads":...,"torch":"2.x", ...extra keys: attn, batch, seq, steps, warmup, final_loss}
step_ms is the mean over the timed steps, tokens_per_s = batch*seq / mean step time,
peak_rss_mib = resource.getrusage(RUSAGE_SELF).ru_maxrss / 1024 (KiB on Linux).
Progress messages go to stderr.

Why: gives a like-for-like baseline for the Rust trainer's throughput and memory.
Nothing is downloaded.

Run:

    python3 scripts/bench_torch.py --method lora [--size bench|tiny] [--batch 4] [--seq 256]
        [--steps 5] [--warmup 2] [--threads N] [--attn eager|sdpa]
    python3 scripts/bench_torch.py --method full
    python3 scripts/bench_torch.py --matmul     # GFLOP/s on benches/matmul.rs's shapes, one JSON line each
"""

import argparse
import json
import os
import resource
import sys
import time

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

SIZES = {
    "bench": dict(vocab_size=2048, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=8, rms_norm_eps=1e-6),
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-5),
}


def build(method, attn, size):
    cfg = LlamaConfig(max_position_embeddings=1024, **SIZES[size])
    model = LlamaForCausalLM._from_config(cfg, attn_implementation=attn, dtype=torch.float32).float()
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(
            r=8,
            lora_alpha=16,
            lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lcfg)  # freezes the base weights
    model.train()
    return model


# benches/matmul.rs's SHAPES: (m, k, n).
MATMUL_SHAPES = [(1024, 512, 512), (1024, 512, 1376), (1024, 1376, 512), (1024, 512, 2048), (256, 64, 256)]


def matmul(threads, iters=30):
    """GFLOP/s of a (m, k) x (k, n) f32 matmul per shape, one JSON line each."""
    for m, k, n in MATMUL_SHAPES:
        a, b = torch.randn(m, k), torch.randn(k, n)
        for _ in range(3):
            a @ b
        t0 = time.perf_counter()
        for _ in range(iters):
            a @ b
        s = (time.perf_counter() - t0) / iters
        print(json.dumps({"impl": "torch", "m": m, "k": k, "n": n, "gflops": 2 * m * k * n / s / 1e9,
                          "threads": threads}))


def main():
    ap = argparse.ArgumentParser(description="PyTorch eager CPU training benchmark (see module docstring)")
    ap.add_argument("--method", choices=["lora", "full"], default="lora")
    ap.add_argument("--size", choices=sorted(SIZES), default="bench")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--attn", choices=["eager", "sdpa"], default="eager")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--matmul", action="store_true", help="time benches/matmul.rs's shapes instead")
    args = ap.parse_args()

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    if args.matmul:
        return matmul(threads)

    model = build(args.method, args.attn, args.size)
    vocab = SIZES[args.size]["vocab_size"]
    params = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in params)
    n_total = sum(p.numel() for p in model.parameters())
    print(f"[bench_torch] method={args.method} size={args.size} attn={args.attn} threads={threads} "
          f"trainable={n_train:,} / total={n_total:,}", file=sys.stderr)
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, vocab, (args.batch, args.seq), dtype=torch.int64)

    def step():
        logits = model(input_ids=ids, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    for i in range(args.warmup):
        t0 = time.perf_counter()
        loss = step()
        print(f"[bench_torch] warmup {i}: {1000 * (time.perf_counter() - t0):.0f} ms loss {loss:.4f}", file=sys.stderr)
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
        print(f"[bench_torch] step {i}: {1000 * times[-1]:.0f} ms loss {loss:.4f}", file=sys.stderr)

    mean = sum(times) / len(times)
    print(json.dumps({
        "impl": "torch",
        "method": args.method,
        "size": args.size,
        "tokens_per_s": round(args.batch * args.seq / mean, 2),
        "step_ms": round(1000 * mean, 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "threads": threads,
        "torch": torch.__version__,
        "attn": args.attn,
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "warmup": args.warmup,
        "final_loss": round(loss, 6),
    }))


if __name__ == "__main__":
    main()
