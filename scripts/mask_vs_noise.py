#!/usr/bin/env python3
"""Score a loss mask against the known injected noise (stdlib only).

    mask_vs_noise.py NOISE_JSONL SCORES_JSONL [TOKENIZER_JSON]

NOISE_JSONL: `xtf-train init-controlled`'s noise.jsonl, one line per training
record, `{"index": i, "noise": [0/1 per label token]}` (1 = injected).
SCORES_JSONL: an XTF run's scores.jsonl, one line per training example with
`mask` (1 = trained on) and the per-attribute flags `noise_ri`, `noise_kn`,
`noise_tr` over the same label tokens.

A token counts as "caught" when the mask drops it (mask 0). Prints one JSON
object: masked share, precision / recall / F1 of the dropped set against the
injected set, the same for each attribute's own flags, and the recall of
each noise kind (when noise.jsonl has `token_kinds`: 1 filler, 2 wrong
digit, 3 off-task). With the model's tokenizer.json it also reports how
often the mask drops the final answer's digits (the `#### N` line) and EOS.
"""
import json
import sys


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def prf(pred, truth):
    tp = sum(1 for p, t in zip(pred, truth) if p and t)
    npred, ntrue = sum(pred), sum(truth)
    precision = tp / npred if npred else 0.0
    recall = tp / ntrue if ntrue else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"flagged": npred, "caught": tp, "precision": precision, "recall": recall, "f1": f1}


def answer_line_stats(scores, tokenizer_path):
    """Share of the final line's digit tokens and of EOS labels the mask drops."""
    tok = json.load(open(tokenizer_path, encoding="utf-8"))
    vocab = {i: t for t, i in tok["model"]["vocab"].items()}
    for a in tok.get("added_tokens", []):
        vocab[a["id"]] = a["content"]
    digits = dropped = eos = 0
    for row in scores:
        toks = [vocab.get(i, "") for i in row["ids"][row["label_start"]:]]
        mask = row["mask"]
        # Byte-level BPE writes a newline as "\u010a".
        last_nl = max((k for k, t in enumerate(toks) if "\u010a" in t), default=-1)
        for k in range(last_nl + 1, len(toks) - 1):
            if any(c.isdigit() for c in toks[k]):
                digits += 1
                dropped += not mask[k]
        eos += not mask[-1]
    return {
        "answer_digit_tokens": digits,
        "answer_digits_masked_share": dropped / digits if digits else 0.0,
        "eos_masked_share": eos / len(scores) if scores else 0.0,
    }


def main(noise_path, scores_path, tokenizer_path=None):
    rows = {r["index"]: r for r in read_jsonl(noise_path)}
    noise = {i: r["noise"] for i, r in rows.items()}
    kinds = {i: r.get("token_kinds") for i, r in rows.items()}
    truth, dropped, kind = [], [], []
    attrs = {"ri": [], "kn": [], "tr": []}
    scores = read_jsonl(scores_path)
    for row in scores:
        flags = noise[row["index"]]
        mask = row["mask"]
        if len(flags) != len(mask):
            sys.exit(
                f"example {row['index']}: {len(flags)} noise flags but {len(mask)} mask entries"
            )
        truth += [bool(x) for x in flags]
        dropped += [not m for m in mask]
        kind += kinds[row["index"]] or [None] * len(mask)
        for a in attrs:
            attrs[a] += [bool(x) for x in row[f"noise_{a}"]]
    out = {
        "label_tokens": len(truth),
        "noise_tokens": sum(truth),
        "noise_share": sum(truth) / len(truth),
        "masked_share": sum(dropped) / len(dropped),
        "mask": prf(dropped, truth),
        "by_attribute": {a: prf(v, truth) for a, v in attrs.items()},
    }
    if None not in kind:
        out["recall_by_kind"] = {}
        for k, name in ((1, "filler"), (2, "wrong_digit"), (3, "off_task")):
            hits = [d for d, t in zip(dropped, kind) if t == k]
            out["recall_by_kind"][name] = {
                "tokens": len(hits),
                "recall": sum(hits) / len(hits) if hits else 0.0,
            }
    if tokenizer_path:
        out.update(answer_line_stats(scores, tokenizer_path))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    main(*sys.argv[1:])
