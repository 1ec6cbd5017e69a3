#!/usr/bin/env python3
"""Sweep mask strategies x models from one paper config and write a Table-1
style Markdown table (base model, Normal, the baselines, XTF) of the config's
[eval] metrics.

    python3 scripts/sweep.py --config configs/math.toml \
        --models deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B,meta-llama/Llama-3.2-3B \
        --warmup-steps 200

For every model it runs, each into runs/sweep/<config>/<model>/<method>/:
  base           `xtf-train eval` on the untouched model
  normal         ordinary fine-tuning ([mask] strategy = "none")
  double_epochs  the same with train.epochs doubled
  data_filter    sample level: drop the examples of lowest mean L_base - L_ref
  slm            Rho-1 selective language modelling (top k% excess loss per batch)
  token_clean    Token Cleaning (top k% L_base - L_ref over the dataset)
  xtf            XTF (the config's [xtf] section)
The reference model the three loss-difference baselines need is --reference
(an adapter or model dir), or else a warm-up run of --warmup-steps optimizer
steps of ordinary fine-tuning on the same data (the paper does not say which
reference it used; see docs/reproduction.md).

Finished runs (an eval.json in their output dir) are skipped, so a sweep can
be resumed. Standard library only (Python >= 3.11 for tomllib).
"""

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

METHODS = ["base", "normal", "double_epochs", "data_filter", "slm", "token_clean", "xtf"]
LABELS = {
    "base": "Base model",
    "normal": "Normal",
    "double_epochs": "Double epochs",
    "data_filter": "Data filter",
    "slm": "SLM (Rho-1)",
    "token_clean": "Token Cleaning",
    "xtf": "XTF",
}
NEEDS_REF = {"data_filter", "slm", "token_clean"}


def toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string is JSON-escaped text
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def to_toml(d, prefix=""):
    """Tables of scalars/lists, nested tables and arrays of tables."""
    out, tables = [], []
    for k, v in d.items():
        if isinstance(v, dict):
            tables.append((k, v))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            tables.append((k, v))
        else:
            out.append(f"{k} = {toml_value(v)}")
    for k, v in tables:
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out += ["", f"[{name}]", to_toml(v, name + ".")]
        else:
            for item in v:
                out += ["", f"[[{name}]]", to_toml(item, name + ".")]
    return "\n".join(x for x in out if x is not None)


def set_key(cfg, dotted, raw):
    *path, last = dotted.split(".")
    node = cfg
    for p in path:
        node = node.setdefault(p, {})
    try:
        node[last] = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        node[last] = raw  # a bare string


def slug(s):
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s)


def derive(base, model, method, out, reference, keep_ratio):
    cfg = json.loads(json.dumps(base))  # deep copy
    cfg["model"]["path"] = model
    cfg["output"]["dir"] = str(out)
    cfg.setdefault("eval", {})["after_train"] = True
    if method in ("base", "normal", "double_epochs") or method in NEEDS_REF:
        if "xtf" in cfg:
            cfg["xtf"]["enabled"] = False
    strategy = {"base": "none", "normal": "none", "double_epochs": "none"}.get(method, method)
    cfg["mask"] = {"strategy": strategy}
    if method in NEEDS_REF:
        cfg["mask"]["reference"] = str(reference)
        cfg["mask"]["keep_ratio"] = keep_ratio
    if method == "xtf":
        cfg.setdefault("xtf", {})["enabled"] = True
    if method == "double_epochs":
        t = cfg.setdefault("train", {})
        if "max_steps" in t:
            t["max_steps"] *= 2
        else:
            t["epochs"] = 2 * t.get("epochs", 1)
    return cfg


def run(cmd, log, dry):
    print("+", " ".join(shlex.quote(c) for c in cmd), flush=True)
    if dry:
        return
    with open(log, "w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        tail = Path(log).read_text(errors="replace").strip().splitlines()[-5:]
        sys.exit(f"failed (exit {r.returncode}), see {log}:\n" + "\n".join(tail))


def metrics(eval_json):
    """{column: value in %} from an eval.json."""
    rep = json.loads(Path(eval_json).read_text())
    cols = {}
    for t in rep.get("tasks", []):
        name = t["name"]
        pk = t.get("pass_at_k") or {}
        if pk:
            for k, v in pk.items():
                cols[f"{name} {k}"] = 100.0 * v
        else:
            cols[f"{name} acc"] = 100.0 * t["accuracy"]
    return cols


def table(rows):
    """rows: [(model, method, {col: value})] -> Markdown with deltas vs Normal."""
    cols = []
    for _, _, m in rows:
        cols += [c for c in m if c not in cols]
    head = "| model | method | " + " | ".join(cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    normal = {model: m for model, method, m in rows if method == "normal"}
    for model, method, m in rows:
        cells = []
        for c in cols:
            v = m.get(c)
            if v is None:
                cells.append("–")
                continue
            ref = normal.get(model, {}).get(c)
            delta = "" if method in ("normal", "base") or ref is None else f" ({v - ref:+.1f})"
            cells.append(f"{v:.1f}{delta}")
        lines.append(f"| {model} | {LABELS[method]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="a paper config with an [eval] section")
    ap.add_argument("--models", help="comma-separated model paths or Hub ids (default: the config's)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    ap.add_argument("--reference", help="reference model for data_filter/slm/token_clean (adapter or model dir)")
    ap.add_argument("--warmup-steps", type=int, default=100,
                    help="without --reference: steps of the warm-up run that makes one (default 100)")
    ap.add_argument("--keep-ratio", type=float, default=0.6, help="k of SLM / Token Cleaning / data filter")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override any config key for every run, e.g. train.max_steps=50")
    ap.add_argument("--out", default="runs/sweep", help="root of the runs")
    ap.add_argument("--bin", default=os.environ.get("XTF_TRAIN", "target/release/xtf-train"))
    ap.add_argument("--dry-run", action="store_true", help="write the configs and print the commands only")
    a = ap.parse_args()

    base = tomllib.loads(Path(a.config).read_text())
    if "eval" not in base or not base["eval"].get("tasks"):
        sys.exit(f"{a.config}: needs an [eval] section with tasks")
    for kv in a.set:
        k, _, v = kv.partition("=")
        set_key(base, k.strip(), v.strip())
    models = a.models.split(",") if a.models else [base["model"]["path"]]
    methods = a.methods.split(",")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        sys.exit(f"unknown methods {bad}; known: {METHODS}")
    if not a.dry_run and not Path(a.bin).exists():
        sys.exit(f"{a.bin} not found: run `cargo build --release` first (or pass --bin)")
    root = Path(a.out) / slug(Path(a.config).stem)
    rows = []
    for model in models:
        mdir = root / slug(model)
        reference = a.reference
        if not reference and NEEDS_REF & set(methods):
            ref_out = mdir / "reference"
            if not (ref_out / "config.resolved.toml").exists():
                cfg = derive(base, model, "normal", ref_out, None, a.keep_ratio)
                cfg["train"]["max_steps"] = a.warmup_steps
                cfg["eval"]["after_train"] = False
                ref_out.mkdir(parents=True, exist_ok=True)
                (ref_out / "sweep.toml").write_text(to_toml(cfg) + "\n")
                run([a.bin, "--config", str(ref_out / "sweep.toml"), "--quiet"], ref_out / "log.txt", a.dry_run)
            reference = str(ref_out)
        for method in methods:
            out = mdir / method
            done = out / "eval.json"
            if not done.exists():
                out.mkdir(parents=True, exist_ok=True)
                cfg = derive(base, model, method, out, reference, a.keep_ratio)
                path = out / "sweep.toml"
                path.write_text(to_toml(cfg) + "\n")
                cmd = [a.bin, "--config", str(path), "--quiet"]
                if method == "base":
                    cmd = [a.bin, "eval", "--config", str(path), "--quiet"]
                run(cmd, out / "log.txt", a.dry_run)
            if done.exists():
                rows.append((model, method, metrics(done)))
    if a.dry_run:
        return
    text = f"Results of `{' '.join(sys.argv)}`\n\n" + table(rows) + "\n\n" + \
        "Metrics in %; in brackets the difference to Normal fine-tuning of the same model.\n"
    (root / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
