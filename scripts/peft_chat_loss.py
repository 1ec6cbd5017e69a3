#!/usr/bin/env python3
"""Held-out answer loss of a LoRA adapter, measured by a real client.

    python3 scripts/peft_chat_loss.py --adapter runs/smollm2-gsm8k/xtf [--n 200]

Loads SmolLM2's GGUF with transformers' own GGUF loader (f32, eager
attention), applies xtf-train's PEFT adapter with `PeftModel.from_pretrained`,
builds the first N GSM8K *test* problems as chats with transformers'
`apply_chat_template` (user: question, assistant: answer), and prints the mean
cross-entropy over every answer token: the tokens after the generation prompt
up to and including the template's end of turn, tokenised with
`add_special_tokens=False` — what xtf-train logs as `eval_loss` for
`configs/smollm2-gsm8k.toml`. The two agree when xtf-train builds the same
sequences as transformers (issue 26: they did not while the leading
`<|im_start|>` was cut). Nothing is downloaded.
"""

import argparse
import json
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
GGUF = HERE.parent.parent / "shared/models/SmolLM2-135M-Instruct.Q4_1.gguf"
TEST = HERE.parent.parent / "shared/data/gsm8k/test.jsonl"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--gguf", default=str(GGUF))
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--max-seq-len", type=int, default=512)
    args = ap.parse_args()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    g = Path(args.gguf)
    tok = AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name)
    base = AutoModelForCausalLM.from_pretrained(
        g.parent, gguf_file=g.name, dtype=torch.float32, attn_implementation="eager"
    )
    model = PeftModel.from_pretrained(base, args.adapter).eval()
    rows = [json.loads(line) for line in TEST.read_text().splitlines()[: args.n]]
    total, count = 0.0, 0
    with torch.no_grad():
        for r in rows:
            chat = [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]
            prompt = tok.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True)
            full = tok.apply_chat_template(chat, tokenize=False)
            p = tok(prompt, add_special_tokens=False)["input_ids"]
            a = tok(full[len(prompt):], add_special_tokens=False)["input_ids"]
            ids = (p + a)[: args.max_seq_len]
            logits = model(torch.tensor([ids])).logits[0]
            lp = torch.log_softmax(logits.float(), -1)
            for t in range(len(p), len(ids)):
                total -= float(lp[t - 1, ids[t]])
                count += 1
    print(json.dumps({"answer_loss": total / count, "tokens": count, "chats": len(rows)}))


if __name__ == "__main__":
    main()
