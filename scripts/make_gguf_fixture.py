#!/usr/bin/env python3
"""Reference fixture for the Rust GGUF converter, from transformers' own GGUF loader.

    make_gguf_fixture.py make  [--gguf PATH] [--out fixture/]
        Loads the GGUF with transformers (AutoModelForCausalLM / AutoTokenizer with
        gguf_file=..., float32), formats the first 3 GSM8K *test* questions with the
        model's chat template (add_generation_prompt=True), and saves
          fixture/smollm2_gsm8k3.safetensors  token ids, full-vocab logits at the last
                                               position, logits at every position for a
                                               fixed 512-id vocabulary subset, top-8 ids
          fixture/smollm2_gsm8k3.json          prompts, tricky strings with the GGUF
                                               tokenizer's ids, versions, file hash

    make_gguf_fixture.py check CONVERTED_DIR [--rust-ids FILE] [--gguf PATH]
        (a) tokenizer.json / AutoTokenizer of the converted dir vs the GGUF tokenizer
            (fixture ids, re-checked live), optionally the Rust `encode` output too;
        (b) AutoModelForCausalLM.from_pretrained(CONVERTED_DIR) logits vs the fixture
            and, live, vs the GGUF-loaded model at every position and vocabulary id;
        (c) converted weights vs transformers' dequantised GGUF weights.
        Prints max |diff| figures; exits 1 if a tolerance is missed.

    make_gguf_fixture.py chats [--gguf PATH] [--out fixture/] [--n 200]
        The first N GSM8K *train* problems as chats ([user: question, assistant:
        answer]) through transformers' own chat path: ids =
        tok(apply_chat_template(chat[:1], add_generation_prompt=True)) +
        tok(rest of apply_chat_template(chat)), add_special_tokens=False, and
        label_start = the generation prompt's length; once with transformers'
        GGUF-built tokenizer and once with the same vocabulary under SmolLM2's
        own pre-tokenizer (Digits(individual) then ByteLevel, as its
        tokenizer.json and llama.cpp's `smollm` say). Saves
          fixture/smollm2_gsm8k_train200_chats.json

Needs CPU torch, transformers (>= 4.45 with GGUF support), gguf, safetensors, numpy.
"""

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

HERE = Path(__file__).resolve().parent
DEFAULT_GGUF = HERE.parent.parent / "shared/models/SmolLM2-135M-Instruct.Q4_1.gguf"
GSM8K = HERE.parent.parent / "shared/data/gsm8k/test.jsonl"
GSM8K_TRAIN = HERE.parent.parent / "shared/data/gsm8k/train.jsonl"
CHATS = "smollm2_gsm8k_train200_chats"
FIXTURE = "smollm2_gsm8k3"
N_SUBSET = 512
TOPK = 8
LOGIT_TOL = 1e-4

TRICKY = [
    "Janet\u2019s ducks lay 16 eggs per day.",
    "na\u00efve caf\u00e9 r\u00e9sum\u00e9 \u00c5ngstr\u00f6m",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8 \u4f60\u597d\uff0c\u4e16\u754c",
    "\u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac \u0420\u043e\u0441\u0441\u0438\u044f \u0645\u0631\u062d\u0628\u0627",
    "Emoji: \U0001f600\U0001f44d\U0001f3fd\U0001f1fa\U0001f1f8 \u2764\ufe0f",
    "e\u0301 combining, zero\u200bwidth, nbsp\u00a0here",
    "12345 3.14159 1,000,000 $2 -7 0.5%",
    "a  1",
    "x\n 1",
    "  42",
    "\t7\n\n8",
    "   leading and trailing   ",
    "multiple   internal    spaces",
    "\n\n\nnewlines\r\nCRLF\ttab",
    "I'm sure they'll say it's fine, don't you think? We've seen it.",
    "def f(x):\n    return x ** 2  # square\n",
    "<|im_start|>user\nhi<|im_end|>\n",
    "<|endoftext|>",
    "<|im_start|><|im_end|><|im_start|>",
    "<repo_name>x<file_sep>y<jupyter_code>",
    "text<|im_end|>more",
    "<|im_start |>not special",
]


def log(*a):
    print(*a, flush=True)


def load_gguf(gguf: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return tok, model.eval()


def prompts(tok):
    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()[:3]]
    return [
        tok.apply_chat_template([{"role": "user", "content": r["question"]}], tokenize=False, add_generation_prompt=True)
        for r in rows
    ]


def encode(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def logits_of(model, ids):
    return model(torch.tensor([ids])).logits[0].float().numpy()


def make(args):
    gguf = Path(args.gguf)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok, model = load_gguf(gguf)
    texts = prompts(tok)
    vocab = model.config.vocab_size
    rng = np.random.default_rng(0)
    arrays = {}
    ids_all = [encode(tok, t) for t in texts]
    # Fixed subset: every id in the prompts plus random ones, padded to N_SUBSET.
    subset = sorted(set(i for ids in ids_all for i in ids))
    rest = np.setdiff1d(np.arange(vocab), subset)
    subset = np.sort(np.concatenate([subset, rng.choice(rest, N_SUBSET - len(subset), replace=False)]))
    arrays["vocab_subset"] = subset.astype(np.int64)
    for i, ids in enumerate(ids_all):
        lg = logits_of(model, ids)
        arrays[f"input_ids_{i}"] = np.array(ids, dtype=np.int64)
        arrays[f"logits_last_{i}"] = lg[-1].astype(np.float32)
        arrays[f"logits_subset_{i}"] = np.ascontiguousarray(lg[:, subset]).astype(np.float32)
        top = np.argsort(-lg, axis=1)[:, :TOPK]
        arrays[f"topk_ids_{i}"] = top.astype(np.int64)
        log(f"prompt {i}: {len(ids)} tokens, argmax at end = {int(top[-1, 0])} {tok.convert_ids_to_tokens(int(top[-1, 0]))!r}")
    save_file(arrays, out / f"{FIXTURE}.safetensors")
    from importlib.metadata import version

    meta = {
        "gguf_file": gguf.name,
        "gguf_sha256": hashlib.sha256(gguf.read_bytes()).hexdigest(),
        "source": "first 3 questions of shared/data/gsm8k/test.jsonl, chat template, add_generation_prompt=True",
        "loader": "transformers AutoModelForCausalLM/AutoTokenizer.from_pretrained(dir, gguf_file=name, dtype=float32)",
        "versions": {
            "transformers": version("transformers"),
            "torch": version("torch"),
            "gguf": version("gguf"),
            "tokenizers": version("tokenizers"),
        },
        "prompts": texts,
        "tricky": [{"text": t, "ids": encode(tok, t)} for t in TRICKY],
        "special_tokens": {
            "bos": tok.bos_token,
            "eos": tok.eos_token,
            "pad": tok.pad_token,
            "unk": tok.unk_token,
            "add_bos_token": getattr(tok, "add_bos_token", None),
        },
    }
    (out / f"{FIXTURE}.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    log(f"wrote {out / FIXTURE}.safetensors ({(out / f'{FIXTURE}.safetensors').stat().st_size} bytes) and .json")


def original_rules(tok):
    """The GGUF-built fast tokenizer with SmolLM2's own pre-tokenizer.

    HuggingFaceTB/SmolLM2-135M-Instruct's tokenizer.json splits every digit
    off first, then applies byte-level GPT-2 splitting; llama.cpp's
    `tokenizer.ggml.pre = "smollm"` does the same (a `\\p{N}` pass before
    the GPT-2 regex). transformers' GGUF converter has no `smollm` entry and
    keeps plain ByteLevel, which is the only difference.
    """
    import copy

    from tokenizers import pre_tokenizers

    orig = copy.deepcopy(tok)
    orig.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    return orig


def chats(args):
    from transformers import AutoTokenizer

    gguf = Path(args.gguf)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    orig = original_rules(tok)
    rows = [json.loads(line) for line in GSM8K_TRAIN.read_text().splitlines()[: args.n]]
    out = []
    differ = []
    for i, r in enumerate(rows):
        chat = [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]
        prompt = tok.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(chat, tokenize=False)
        assert full.startswith(prompt), i
        response = full[len(prompt):]
        rec = {"index": i}
        for name, t in (("", tok), ("_original", orig)):
            p, rsp = encode(t, prompt), encode(t, response)
            rec["ids" + name] = p + rsp
            rec["label_start" + name] = len(p)
        # The whole rendering tokenised at once splits the same way.
        assert encode(tok, full) == rec["ids"], i
        if rec["ids_original"] == rec["ids"]:
            del rec["ids_original"], rec["label_start_original"]
        else:
            differ.append(i)
        out.append(rec)
    from importlib.metadata import version

    meta = {
        "gguf_file": gguf.name,
        "gguf_sha256": hashlib.sha256(gguf.read_bytes()).hexdigest(),
        "source": f"first {args.n} rows of shared/data/gsm8k/train.jsonl as [user: question, assistant: answer]",
        "rule": "ids = tok(apply_chat_template(chat[:1], add_generation_prompt=True)) + "
        "tok(apply_chat_template(chat)[len(prompt):]), add_special_tokens=False; label_start = len(prompt ids)",
        "tokenizers": {
            "ids": "transformers AutoTokenizer.from_pretrained(dir, gguf_file=name)",
            "ids_original": "the same vocabulary with SmolLM2's pre-tokenizer Sequence[Digits(individual_digits), "
            "ByteLevel(add_prefix_space=False)]; present only where it differs",
        },
        "versions": {"transformers": version("transformers"), "tokenizers": version("tokenizers")},
        "differ": differ,
        "chats": out,
    }
    path = Path(args.out) / f"{CHATS}.json"
    path.write_text(json.dumps(meta, ensure_ascii=False, separators=(",", ":")) + "\n")
    log(f"wrote {path}: {len(out)} chats, original rules differ on {differ}")
    for i in differ:
        a, b = out[i]["ids"], out[i]["ids_original"]
        k = next(j for j in range(min(len(a), len(b))) if a[j] != b[j])
        log(f"  chat {i}: transformers-gguf {tok.convert_ids_to_tokens(a[k:k + 3])} "
            f"vs original {tok.convert_ids_to_tokens(b[k:k + 3])}")


def check(args):
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    conv = Path(args.converted)
    fx = Path(args.out)
    meta = json.loads((fx / f"{FIXTURE}.json").read_text())
    arrays = load_file(str(fx / f"{FIXTURE}.safetensors"))
    ok = True

    # (a) tokenisation
    raw = Tokenizer.from_file(str(conv / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(conv)
    gtok, gmodel = load_gguf(Path(args.gguf))
    rust = json.loads(Path(args.rust_ids).read_text()) if args.rust_ids else None
    cases = [(p, list(map(int, arrays[f"input_ids_{i}"]))) for i, p in enumerate(meta["prompts"])]
    cases += [(c["text"], c["ids"]) for c in meta["tricky"]]
    n_same = 0
    diverging = []
    for k, (text, want) in enumerate(cases):
        got_raw = raw.encode(text, add_special_tokens=False).ids
        got_auto = encode(auto, text)
        live = encode(gtok, text)
        assert live == want, f"fixture ids are stale for {text!r}"
        same = got_raw == want and got_auto == want and (rust is None or rust[k] == want)
        n_same += same
        if not same:
            diverging.append((text, want, got_raw, got_auto, rust[k] if rust else None))
        # Round trip: decoding our ids gives the text back.
        if raw.decode(got_raw, skip_special_tokens=False) != text:
            log(f"  decode round trip differs for {text!r}: {raw.decode(got_raw, skip_special_tokens=False)!r}")
    log(f"(a) tokenizer: {n_same}/{len(cases)} strings give identical ids to transformers' GGUF tokenizer"
        + (" (tokenizers-python, AutoTokenizer and Rust)" if rust else " (tokenizers-python and AutoTokenizer)"))
    for text, want, got_raw, got_auto, got_rust in diverging:
        log(f"    differs on {text!r}:\n      transformers-gguf {gtok.convert_ids_to_tokens(want)}\n"
            f"      converted         {raw.encode(text, add_special_tokens=False).tokens}"
            + ("" if got_auto == got_raw else f"\n      AutoTokenizer     {auto.convert_ids_to_tokens(got_auto)}")
            + ("" if got_rust in (None, got_raw) else f"\n      rust              {got_rust}"))
    bad_prompts = [t for t, *_ in diverging if t in meta["prompts"]]
    if bad_prompts:
        ok = False
        log("  FAIL: a chat prompt tokenises differently")
    tcfg = json.loads((conv / "tokenizer_config.json").read_text())
    log(f"    tokenizer_config: bos={tcfg.get('bos_token')!r} eos={tcfg.get('eos_token')!r} "
        f"add_bos_token={tcfg.get('add_bos_token')} (transformers-gguf: {meta['special_tokens']})")
    chat = auto.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    chat_ref = gtok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    log(f"    chat template renders identically: {chat == chat_ref}")
    ok &= chat == chat_ref
    ids_with_specials = auto("hello")["input_ids"]
    log(f"    AutoTokenizer(converted)('hello') with special tokens = {ids_with_specials}, "
        f"GGUF tokenizer = {gtok('hello')['input_ids']}")

    # (b) logits
    cmodel = AutoModelForCausalLM.from_pretrained(conv, dtype=torch.float32).eval()
    subset = arrays["vocab_subset"]
    worst_fixture = 0.0
    worst_live = 0.0
    for i in range(len(meta["prompts"])):
        ids = list(map(int, arrays[f"input_ids_{i}"]))
        lg = logits_of(cmodel, ids)
        d_last = float(np.abs(lg[-1] - arrays[f"logits_last_{i}"]).max())
        d_sub = float(np.abs(lg[:, subset] - arrays[f"logits_subset_{i}"]).max())
        top_same = bool((np.argsort(-lg, axis=1)[:, :1] == arrays[f"topk_ids_{i}"][:, :1]).all())
        live = logits_of(gmodel, ids)
        d_live = float(np.abs(lg - live).max())
        worst_fixture = max(worst_fixture, d_last, d_sub)
        worst_live = max(worst_live, d_live)
        log(f"(b) prompt {i} ({len(ids)} tokens): max|diff| vs fixture last-pos {d_last:.3e}, "
            f"subset all-pos {d_sub:.3e}; vs live GGUF model, all positions x vocab {d_live:.3e}; "
            f"argmax equal at every position: {top_same}  (|logit| max {np.abs(live).max():.1f})")
    ok &= worst_fixture <= LOGIT_TOL and worst_live <= LOGIT_TOL

    # (c) weights
    gsd = gmodel.state_dict()
    csd = cmodel.state_dict()
    worst_w = 0.0
    worst_name = None
    for name, t in gsd.items():
        if name not in csd:
            log(f"(c) {name} missing from converted model")
            ok = False
            continue
        d = float((t - csd[name]).abs().max())
        if d > worst_w:
            worst_w, worst_name = d, name
    log(f"(c) weights: {len(gsd)} tensors, max|diff| {worst_w:.3e}" + (f" ({worst_name})" if worst_name else ""))
    for key in ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"]:
        a, b = getattr(gmodel.config, key, None), getattr(cmodel.config, key, None)
        if a != b:
            log(f"    config {key}: transformers-gguf {a!r} vs converted {b!r}")
    rt = (getattr(gmodel.config, "rope_parameters", None) or {}).get("rope_theta", getattr(gmodel.config, "rope_theta", None))
    rc = (getattr(cmodel.config, "rope_parameters", None) or {}).get("rope_theta", getattr(cmodel.config, "rope_theta", None))
    log(f"    rope_theta: transformers-gguf {rt} vs converted {rc}")
    log("PASS" if ok else "FAIL")
    return 0 if ok else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("--gguf", default=str(DEFAULT_GGUF))
    m.add_argument("--out", default=str(HERE.parent / "tests/fixtures/gguf"))
    ch = sub.add_parser("chats")
    ch.add_argument("--gguf", default=str(DEFAULT_GGUF))
    ch.add_argument("--out", default=str(HERE.parent / "tests/fixtures/gguf"))
    ch.add_argument("--n", type=int, default=200)
    c = sub.add_parser("check")
    c.add_argument("converted")
    c.add_argument("--gguf", default=str(DEFAULT_GGUF))
    c.add_argument("--out", default=str(HERE.parent / "tests/fixtures/gguf"))
    c.add_argument("--rust-ids", help="JSON from `gguf-scratch encode` over check-texts.json, same order")
    c.add_argument("--dump-texts", help="write the check strings (prompts then tricky) as JSON here and exit")
    args = ap.parse_args()
    if args.cmd == "make":
        make(args)
        return 0
    if args.cmd == "chats":
        chats(args)
        return 0
    if args.dump_texts:
        meta = json.loads((Path(args.out) / f"{FIXTURE}.json").read_text())
        texts = meta["prompts"] + [c["text"] for c in meta["tricky"]]
        Path(args.dump_texts).write_text(json.dumps(texts, ensure_ascii=False))
        return 0
    return check(args)


if __name__ == "__main__":
    sys.exit(main())
