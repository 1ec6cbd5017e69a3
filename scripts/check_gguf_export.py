#!/usr/bin/env python3
"""Check a GGUF written by `xtf-train export` with transformers' own GGUF
loader (the real client; it dequantises with the `gguf` package): the model
and tokenizer it builds from the file against the HF-format source (plus a
PEFT adapter merged with peft's `merge_and_unload`, if given). Prints one
JSON line: max |logit difference| over a few sequences, and whether the
two tokenizers give the same ids on sample texts. The integration test
`export::transformers_reads_the_export` runs it when python3 has torch,
transformers, peft and gguf; it skips otherwise.

    python3 scripts/check_gguf_export.py OUT.gguf HF_DIR [ADAPTER_DIR]
"""
import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

gguf, hf_dir = sys.argv[1], sys.argv[2]
adapter = sys.argv[3] if len(sys.argv) > 3 else None
torch.manual_seed(0)

ref = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
if adapter:
    from peft import PeftModel

    ref = PeftModel.from_pretrained(ref, adapter).merge_and_unload().eval()
got = AutoModelForCausalLM.from_pretrained(
    os.path.dirname(os.path.abspath(gguf)), gguf_file=os.path.basename(gguf), dtype=torch.float32
).eval()

vocab = ref.config.vocab_size
ids = torch.randint(3, vocab, (3, 17))
with torch.no_grad():
    a = ref(ids).logits
    b = got(ids).logits
diff = (a - b).abs().max().item()

tok_ref = AutoTokenizer.from_pretrained(hf_dir)
tok_got = AutoTokenizer.from_pretrained(
    os.path.dirname(os.path.abspath(gguf)), gguf_file=os.path.basename(gguf)
)
texts = ["Question: what is 12 + 30?\nAnswer: 42", "hello world", "  two  spaces\tand tabs 1234"]
same = all(
    tok_ref(t, add_special_tokens=False)["input_ids"] == tok_got(t, add_special_tokens=False)["input_ids"]
    for t in texts
)
print(json.dumps({"max_abs_logit_diff": diff, "tokenizer_ids_equal": same, "max_abs_logit": a.abs().max().item()}))
