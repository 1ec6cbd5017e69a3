#!/usr/bin/env python3
"""Generate the tiny HF-transformers reference fixtures used by the Rust tests.

What: for each family (llama, qwen2, mistral, qwen3) this builds a tiny, randomly
initialised causal LM (f32, eager attention, fixed seeds), saves it with
`save_pretrained(..., safe_serialization=True)` to `tests/fixtures/<family>/`
and writes `tests/fixtures/<family>/reference.safetensors` with reference
outputs computed by HF transformers:

    input_ids  I64 [2,12]   random ids in [3,96); row 1 right-padded with 0 after 9 tokens
    lengths    I64 [2]      [12, 9]
    logits     F32 [2,12,96] per-row logits on the unpadded ids (0.0 at padding)
    kn         F32 [2,12]   1 - softmax(logits[b,p-1])[ids[b,p]] for 1 <= p < len_b, else 0
    ri_mean_all, ri_relative_all, ri_mean_last, ri_mean_l0   F32 [2,12]
                            "received attention" scores from the eager attention probs
    tr_dist_cos, tr_dist_euclid  F32 [2,12], tr_v F32 [hidden]
                            distances of token embeddings to the batch mean embedding V

For llama it additionally writes a PEFT LoRA adapter to
`tests/fixtures/llama/adapter/` and the tensors `logits_lora` (adapter active)
and `logits_merged_check` (same adapter merged into the base weights with
`merge_and_unload`; must equal `logits_lora` up to float noise) to llama's
reference.safetensors.

Why: the Rust (candle) implementation of model loading, forward, LoRA and the
RI/TR/KN token scores is tested against these independent reference numbers.
Everything is created locally from random init; nothing is downloaded.
The script is deterministic and idempotent (re-running rewrites identical data).

Run (from the repository root):

    python3 scripts/make_fixtures.py            # every family
    python3 scripts/make_fixtures.py qwen3      # only the named families
"""

import json
import math
import os
import shutil
import sys

import numpy as np
import torch
from safetensors.torch import save_file

FIXTURES = os.path.join("tests", "fixtures")
VOCAB = 96
BATCH = 2
SEQ = 12
LENGTHS = [12, 9]
PAD_ID = 0

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=PAD_ID,
)


def make_config(family):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    if family == "llama":
        return LlamaConfig(
            **COMMON,
            head_dim=16,  # != hidden/heads (= 8): the loader must honour head_dim
            rope_theta=10000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8,
            },
            tie_word_embeddings=False,
            attention_bias=False,
            mlp_bias=False,
        )
    if family == "qwen2":
        return Qwen2Config(
            **COMMON,
            rope_theta=1e6,
            use_sliding_window=False,
            tie_word_embeddings=True,
        )
    if family == "qwen3":
        return Qwen3Config(
            **COMMON,
            head_dim=16,  # != hidden/heads, as on the real Qwen3 sizes
            rope_theta=1e6,
            attention_bias=False,
            use_sliding_window=False,
            tie_word_embeddings=True,
        )
    if family == "mistral":
        return MistralConfig(
            **COMMON,
            sliding_window=5,
            rope_theta=10000.0,
            tie_word_embeddings=False,
        )
    raise ValueError(family)


def build_model(family, seed):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = make_config(family)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    model = model.float().eval()
    # Re-initialise with larger values so that the maths is non-trivial.
    # named_parameters() yields tied parameters once (qwen2: embed == lm_head).
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return model


def make_inputs(seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=gen, dtype=torch.int64)
    lengths = torch.tensor(LENGTHS, dtype=torch.int64)
    for b, n in enumerate(LENGTHS):
        ids[b, n:] = PAD_ID
    return ids, lengths


@torch.no_grad()
def per_row_forward(model, ids, lengths, want_attn=False):
    """Run every row separately on its unpadded ids. Returns logits [B,T,V]
    (0 at padding) and, if requested, a list (per row) of attention lists
    (per layer) of numpy arrays [heads, L, L]."""
    B, T = ids.shape
    logits = torch.zeros(B, T, VOCAB, dtype=torch.float32)
    attns = []
    for b in range(B):
        n = int(lengths[b])
        out = model(input_ids=ids[b : b + 1, :n], output_attentions=want_attn, use_cache=False)
        logits[b, :n] = out.logits[0].float()
        if want_attn:
            attns.append([a[0].double().numpy() for a in out.attentions])
    return logits, attns


def kn_scores(logits, ids, lengths):
    B, T = ids.shape
    kn = np.zeros((B, T), dtype=np.float64)
    lg = logits.double().numpy()
    for b in range(B):
        for p in range(1, int(lengths[b])):
            row = lg[b, p - 1]
            e = np.exp(row - row.max())
            prob = e / e.sum()
            kn[b, p] = 1.0 - prob[int(ids[b, p])]
    return kn.astype(np.float32)


def ri_scores(attns, lengths, layers, relative):
    """S_RI(j) = mean over selected layers and all query heads of
    r_j = 1/(T-j) * sum_{i=j}^{T-1} w_i * A[i,j], w_i = 1 (mean) or i+1 (relative)."""
    out = np.zeros((BATCH, SEQ), dtype=np.float64)
    for b in range(BATCH):
        T = int(lengths[b])
        n_layers = len(attns[b])
        sel = [l % n_layers for l in layers] if layers is not None else list(range(n_layers))
        for j in range(T):
            total = 0.0
            count = 0
            for l in sel:
                A = attns[b][l]
                for h in range(A.shape[0]):
                    s = 0.0
                    for i in range(j, T):
                        w = float(i + 1) if relative else 1.0
                        s += w * A[h, i, j]
                    total += s / (T - j)
                    count += 1
            out[b, j] = total / count
    return out.astype(np.float32)


def tr_scores(E, ids, lengths):
    E = E.double().numpy()
    B, T = ids.shape
    means = []
    for b in range(B):
        n = int(lengths[b])
        means.append(E[ids[b, :n].numpy()].mean(axis=0))
    V = np.mean(np.stack(means), axis=0)
    cos_d = np.zeros((B, T))
    euc_d = np.zeros((B, T))
    vn = np.linalg.norm(V)
    for b in range(B):
        for p in range(int(lengths[b])):
            e = E[int(ids[b, p])]
            en = np.linalg.norm(e)
            cos = 0.0 if en == 0.0 or vn == 0.0 else float(e @ V) / (en * vn)
            cos_d[b, p] = 1.0 - cos
            euc_d[b, p] = np.linalg.norm(e - V)
    return cos_d.astype(np.float32), euc_d.astype(np.float32), V.astype(np.float32)


def print_inv_freq(model):
    cfg = model.config
    head_dim = cfg.head_dim
    rp = getattr(cfg, "rope_parameters", None) or {}
    theta = rp.get("rope_theta", getattr(cfg, "rope_theta", None))
    default = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    scaled = model.model.rotary_emb.inv_freq.double()
    print("  llama3 rope: inv_freq default :", [f"{x:.6g}" for x in default.tolist()])
    print("  llama3 rope: inv_freq scaled  :", [f"{x:.6g}" for x in scaled.tolist()])
    changed = int((~torch.isclose(default, scaled, rtol=1e-6, atol=0)).sum())
    print(f"  llama3 rope: {changed}/{len(default)} frequencies changed by the scaling")
    assert changed > 0, "llama3 scaling did not change any frequency"


def make_lora(model, ids, lengths, out_dir, seed):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    lcfg = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lcfg)  # injects LoRA layers into `model` in place
    # Explicit, PEFT-version-independent init: A ~ N(0,0.2), B ~ N(0,0.1) (B non-zero).
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            elif "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    peft_model.eval()
    peft_model.peft_config["default"].base_model_name_or_path = "tests/fixtures/llama"
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    peft_model.save_pretrained(out_dir, safe_serialization=True)
    readme = os.path.join(out_dir, "README.md")
    if os.path.exists(readme):
        os.remove(readme)  # auto-generated model card, not needed
    # PEFT stores target_modules as a set, so its order in the JSON depends on
    # the hash seed; sort it to keep the fixture byte-for-byte reproducible.
    cfg_path = os.path.join(out_dir, "adapter_config.json")
    with open(cfg_path) as f:
        acfg = json.load(f)
    if isinstance(acfg.get("target_modules"), list):
        acfg["target_modules"] = sorted(acfg["target_modules"])
    with open(cfg_path, "w") as f:
        json.dump(acfg, f, indent=2, sort_keys=True)
        f.write("\n")

    logits_lora, _ = per_row_forward(peft_model, ids, lengths)
    merged = peft_model.merge_and_unload()
    logits_merged, _ = per_row_forward(merged, ids, lengths)
    diff = (logits_lora - logits_merged).abs().max().item()
    print(f"  lora: max|logits_lora - logits_merged| = {diff:.3e}")
    assert diff < 1e-4

    from safetensors import safe_open

    print("  adapter tensors (adapter_model.safetensors):")
    with safe_open(os.path.join(out_dir, "adapter_model.safetensors"), "pt") as f:
        for k in sorted(f.keys()):
            print(f"    {k} {list(f.get_slice(k).get_shape())}")
    with open(os.path.join(out_dir, "adapter_config.json")) as f:
        print("  adapter_config.json:")
        print(f.read())
    return logits_lora, logits_merged


def make_family(family, seed):
    print(f"== {family}")
    out_dir = os.path.join(FIXTURES, family)
    os.makedirs(out_dir, exist_ok=True)
    model = build_model(family, seed)
    if family == "llama":
        print_inv_freq(model)
    model.save_pretrained(out_dir, safe_serialization=True)

    ids, lengths = make_inputs(seed + 100)
    logits, attns = per_row_forward(model, ids, lengths, want_attn=True)
    for b in range(BATCH):  # sanity: attention probabilities are row-stochastic causal
        for A in attns[b]:
            assert np.allclose(A.sum(-1), 1.0, atol=1e-5)
            assert np.allclose(np.triu(A, k=1), 0.0)

    ref = {
        "input_ids": ids.contiguous(),
        "lengths": lengths.contiguous(),
        "logits": logits.contiguous(),
        "kn": torch.from_numpy(kn_scores(logits, ids, lengths)),
        "ri_mean_all": torch.from_numpy(ri_scores(attns, lengths, None, relative=False)),
        "ri_relative_all": torch.from_numpy(ri_scores(attns, lengths, None, relative=True)),
        "ri_mean_last": torch.from_numpy(ri_scores(attns, lengths, [-1], relative=False)),
        "ri_mean_l0": torch.from_numpy(ri_scores(attns, lengths, [0], relative=False)),
    }
    # Greedy generation (no sampling, no early stop): 10 new tokens after the
    # first 7 ids of row 0, with transformers' KV-cache generate().
    prompt = ids[:1, :7]
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, min_new_tokens=10,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    ref["greedy_prompt"] = prompt[0].clone()
    ref["greedy_output"] = out[0, 7:].clone()
    cos_d, euc_d, V = tr_scores(model.get_input_embeddings().weight.detach(), ids, lengths)
    ref["tr_dist_cos"] = torch.from_numpy(cos_d)
    ref["tr_dist_euclid"] = torch.from_numpy(euc_d)
    ref["tr_v"] = torch.from_numpy(V)

    if family == "llama":
        lora, merged = make_lora(model, ids, lengths, os.path.join(out_dir, "adapter"), seed + 200)
        ref["logits_lora"] = lora.contiguous()
        ref["logits_merged_check"] = merged.contiguous()

    save_file({k: v.contiguous() for k, v in ref.items()}, os.path.join(out_dir, "reference.safetensors"))
    print(f"  input_ids:\n{ids}")
    for k in ("kn", "ri_mean_all", "tr_dist_cos"):
        print(f"  {k}[0]: {np.round(ref[k][0].numpy(), 4).tolist()}")


def main():
    if not os.path.isdir("tests"):
        sys.exit("run from the repository root (tests/ not found)")
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    families = ["llama", "qwen2", "mistral", "qwen3"]
    chosen = sys.argv[1:] or families
    for seed, family in enumerate(families):
        if family in chosen:
            make_family(family, 1000 * (seed + 1))
    print("\n== saved config.json files")
    for family in chosen:
        path = os.path.join(FIXTURES, family, "config.json")
        with open(path) as f:
            cfg = json.load(f)
        print(f"--- {path}")
        print(json.dumps(cfg, indent=2, sort_keys=True))
        rp = cfg.get("rope_parameters") or {}
        assert "rope_theta" in cfg or "rope_theta" in rp, "rope_theta missing from config.json"
        if family == "llama":
            scaling = cfg.get("rope_scaling") or rp
            assert scaling.get("rope_type") == "llama3", "llama3 rope scaling missing from config.json"
    print("\n== fixture sizes")
    total = 0
    for root, _, files in os.walk(FIXTURES):
        for fn in sorted(files):
            p = os.path.join(root, fn)
            total += os.path.getsize(p)
            print(f"  {os.path.getsize(p):8d}  {p}")
    print(f"  {total:8d}  total bytes")


if __name__ == "__main__":
    main()
