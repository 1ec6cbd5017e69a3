#!/usr/bin/env python3
"""Check that an xtf-train output directory loads in HF transformers / PEFT and
(optionally) that it reproduces our logits.

What: if OUT_DIR contains adapter_config.json it is treated as a PEFT LoRA
adapter: the base model is loaded from --base with AutoModelForCausalLM (f32,
eager attention) and the adapter applied with PeftModel.from_pretrained.
Otherwise OUT_DIR is loaded as a full model with AutoModelForCausalLM.
With --logits FILE.safetensors (keys `input_ids` I64 [B,T] and `logits` F32
[B,T,V], no padding) the model is run on `input_ids` and the max abs
difference to `logits` is printed; the exit status is 1 if it exceeds 1e-4
(or --tol). Without --logits it prints a short greedy continuation to prove
that loading works.

Why: proves that what the Rust trainer writes is consumable by the standard
Python stack and numerically matches it. Nothing is downloaded.

Run:

    python3 scripts/verify_outputs.py --base MODEL_DIR --out OUT_DIR [--logits OUR_LOGITS.safetensors]

e.g. python3 scripts/verify_outputs.py --base tests/fixtures/llama --out tests/fixtures/llama/adapter
"""

import argparse
import os
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def load(base, out):
    if os.path.exists(os.path.join(out, "adapter_config.json")):
        from peft import PeftModel

        if base is None:
            sys.exit("--base is required when --out is a LoRA adapter")
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="eager")
        model = PeftModel.from_pretrained(model, out)
        print(f"loaded base {base} + LoRA adapter {out}")
    else:
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
        print(f"loaded full model {out}")
    return model.float().eval()


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", help="base model directory (needed for a LoRA adapter)")
    ap.add_argument("--out", required=True, help="trainer output directory (adapter or full model)")
    ap.add_argument("--logits", help="safetensors with input_ids [B,T] and logits [B,T,V] to compare against")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--new-tokens", type=int, default=8)
    args = ap.parse_args()

    model = load(args.base, args.out)

    if args.logits:
        ref = load_file(args.logits)
        ids, ours = ref["input_ids"].long(), ref["logits"].float()
        theirs = model(input_ids=ids, use_cache=False).logits.float()
        if theirs.shape != ours.shape:
            print(f"FAIL shape mismatch: transformers {tuple(theirs.shape)} vs ours {tuple(ours.shape)}")
            return 1
        diff = (theirs - ours).abs().max().item()
        ok = diff <= args.tol
        print(f"{'OK' if ok else 'FAIL'} max abs diff = {diff:.3e} (tol {args.tol:g}) over {tuple(ours.shape)}")
        return 0 if ok else 1

    # Greedy continuation from the BOS token (plain loop: no tokenizer/generation config needed).
    bos = model.config.bos_token_id if model.config.bos_token_id is not None else 1
    ids = torch.tensor([[bos]])
    for _ in range(args.new_tokens):
        nxt = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    print("greedy token ids:", ids[0].tolist())
    return 0


if __name__ == "__main__":
    sys.exit(main())
