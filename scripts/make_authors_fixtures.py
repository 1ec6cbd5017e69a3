#!/usr/bin/env python3
"""Reference numbers for the per-example caps and the authors' variant
(spec "Per-example caps and the authors' variant"), for tests/authors.rs.

Writes tests/fixtures/authors/:

- rules.json: per-example RI fences from numpy.percentile (method "linear",
  numpy's default, factor 1.5 — what the authors' code uses) on seeded
  float32 score arrays, the flags below each fence, and the flags after the
  spec's cap (at most floor(n * share), lowest score first, ties to the
  earlier position, via a stable argsort); and for saved float32 S_TR-like
  arrays, skimage.filters.threshold_multiotsu(classes=5, nbins=256) and the
  cut chosen by the authors' cumulative rule for several cut shares `r`.
- <family>_final_hidden.safetensors: for the committed fixture checkpoints
  (tests/fixtures/<family>), transformers' final (normed) hidden state of
  chosen token ids each run alone as a one-token sequence, and the domain
  vector of word id lists (each word's ids run as one sequence, averaged
  over positions, then averaged over words), in float32.

Numbers in JSON are strings of their shortest repr (parsed by Rust's
str::parse, see make_filter_fixtures.py). Run from the repository root with
numpy, scikit-image, torch and transformers (scripts/requirements.txt):

    python3 scripts/make_authors_fixtures.py
"""

import json
import os

import numpy as np
import skimage
import torch
from safetensors.torch import save_file
from skimage.filters import threshold_multiotsu
from transformers import AutoModelForCausalLM

OUT = os.path.join("tests", "fixtures", "authors")


def s32(x):
    return str(np.float32(x))


def ri_cases():
    rng = np.random.default_rng(11)
    cases = []
    # Attention received is right-skewed, so a lower fence rarely bites on
    # raw scores; these cases have low tails and clusters so that fences
    # and caps both bind.
    for n, kind in [(40, "left_skewed"), (23, "normal_low_outliers"), (9, "uniform"),
                    (60, "ties_low_cluster"), (100, "low_cluster")]:
        if kind == "uniform":
            v = rng.uniform(0.0, 1.0, n)
        elif kind == "left_skewed":
            v = 1.0 - rng.lognormal(-3.0, 0.9, n)
        elif kind == "normal_low_outliers":
            v = rng.normal(0.5, 0.05, n)
            v[[2, 7, 15]] = [0.01, 0.02, 0.01]
        elif kind == "ties_low_cluster":
            v = np.round(rng.normal(0.5, 0.05, n), 2)
            v[rng.choice(n, 9, replace=False)] = 0.1
        else:
            v = rng.normal(0.5, 0.03, n)
            v[rng.choice(n, 14, replace=False)] = rng.uniform(0.0, 0.2, 14)
        v = v.astype(np.float32)
        q1, q3 = np.percentile(v.astype(np.float64), [25, 75])
        fence = q1 - 1.5 * (q3 - q1)
        rule = v.astype(np.float64) < fence
        capped = {}
        for share in ("0.05", "0.1", "0.25"):
            k = int(np.floor(n * float(share) + 1e-9))
            order = np.argsort(v, kind="stable")
            flagged = [int(i) for i in order if rule[i]][:k]
            capped[share] = sorted(flagged)
        cases.append({
            "name": f"{kind}_n{n}",
            "values": [s32(x) for x in v],
            "q1": repr(float(q1)), "q3": repr(float(q3)), "fence": repr(float(fence)),
            "rule_flags": [int(i) for i in np.nonzero(rule)[0]],
            "capped": capped,
        })
    return cases


def authors_cut(values, thresholds, r):
    """The authors' code's rule, as described in docs/xtf.md."""
    shares = [float(np.mean(values >= t)) for t in thresholds]
    cum = 0.0
    for i, p in enumerate(shares):
        cum += p
        if cum > r:
            return thresholds[i - 1] if i > 0 else thresholds[0]
    return thresholds[-1]


def tr_cases():
    rng = np.random.default_rng(5)
    arrays = {
        "uniform": rng.uniform(0, 1, 3000),
        "skewed_high": 1 - rng.beta(1.5, 6, 3000),
        "trimodal": np.concatenate([rng.normal(0.2, 0.05, 800), rng.normal(0.55, 0.05, 1500),
                                    rng.normal(0.9, 0.03, 700)]),
        "mostly_low": rng.beta(1.2, 5, 3000),
    }
    cases = []
    for name, v in arrays.items():
        v = np.clip(v, 0, 1).astype(np.float32)
        th = threshold_multiotsu(v, classes=5, nbins=256)
        cuts = {r: authors_cut(v, list(th), float(r)) for r in ("0.5", "1.0", "1.5", "2.0", "9.0")}
        cases.append({
            "name": name,
            "values": [s32(x) for x in v],
            "thresholds": [s32(t) for t in th],
            "shares_at_or_above": [repr(float(np.mean(v >= t))) for t in th],
            "cuts": {r: s32(c) for r, c in cuts.items()},
        })
    return cases


def final_hidden(family):
    path = os.path.join("tests", "fixtures", family)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    vocab = model.config.vocab_size
    ids = torch.tensor([1, 2, 3, 5, 8, 13, 21, vocab - 1])
    words = [[4, 9], [7], [10, 11, 12]]
    with torch.no_grad():
        lone = model(ids[:, None], output_hidden_states=True).hidden_states[-1][:, 0, :]
        per_word = []
        for w in words:
            h = model(torch.tensor([w]), output_hidden_states=True).hidden_states[-1][0]
            per_word.append(h.mean(0))
        v = torch.stack(per_word).mean(0)
        cos = torch.nn.functional.cosine_similarity(lone, v[None, :], dim=-1, eps=1e-8)
    flat_words = torch.tensor([t for w in words for t in w])
    lens = torch.tensor([len(w) for w in words])
    save_file({
        "ids": ids.to(torch.int64), "lone_hidden": lone.contiguous().float(),
        "word_ids": flat_words.to(torch.int64), "word_lens": lens.to(torch.int64),
        "word_domain_vector": v.contiguous().float(), "cosine": cos.contiguous().float(),
    }, os.path.join(OUT, f"{family}_final_hidden.safetensors"))


def main():
    os.makedirs(OUT, exist_ok=True)
    doc = {
        "about": "per-example RI fences and caps; the authors' TR cut rule (scripts/make_authors_fixtures.py)",
        "versions": {"numpy": np.__version__, "scikit-image": skimage.__version__},
        "ri": ri_cases(),
        "tr": tr_cases(),
    }
    with open(os.path.join(OUT, "rules.json"), "w") as f:
        json.dump(doc, f, indent=1)
    for family in ("llama", "qwen2", "mistral"):
        final_hidden(family)


if __name__ == "__main__":
    main()
