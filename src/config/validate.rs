//! One validation pass over a parsed config: a short function per section,
//! every impossible value collected, the first reported as the error and
//! the rest appended, so a user fixes a config in one round. Float keys
//! reject NaN and infinities along with their range.

use super::{Config, DeviceSpec, Layers, Method, Quantize, Strategy, KNOWN_MODULES};
use super::{DataSection, EvalSection, LoraSection, MaskSection, ModelSection};
use super::{TrainSection, XtfSection};
use crate::error::{Error, Result};

/// The problems found so far, as (key, message).
#[derive(Default)]
struct Checks(Vec<(String, String)>);

impl Checks {
    fn check(&mut self, ok: bool, key: &str, msg: impl Into<String>) {
        if !ok {
            self.0.push((key.into(), msg.into()));
        }
    }

    /// `v` is finite and at least (or, `strict`, above) zero.
    fn non_negative(&mut self, v: f64, key: &str, strict: bool, what: &str) {
        let ok = v.is_finite() && if strict { v > 0.0 } else { v >= 0.0 };
        self.check(ok, key, format!("{what}, got {v}"));
    }
}

impl Config {
    /// Every impossible value, reported together (first one as the error,
    /// the rest appended), so a user fixes a config in one round.
    pub fn validate(&self) -> Result<()> {
        let mut c = Checks::default();
        model(&self.model, &mut c);
        data(&self.data, &mut c);
        train(&self.train, &mut c);
        lora(&self.lora, &mut c);
        c.check(
            self.model.quantize.is_none() || self.train.method == Method::Lora,
            "model.quantize",
            "a quantised base is frozen: it needs train.method = \"lora\" (or quantize = \"none\")",
        );
        c.check(
            self.model.quantize != Quantize::Keep || self.model.path.ends_with(".gguf"),
            "model.quantize",
            "\"keep\" keeps a GGUF file's quantised tensors: model.path must be a .gguf file (use q8_0, q4_0 or q4k to quantise other checkpoints)",
        );
        c.check(
            !(self.output.merge && self.train.method == Method::Full),
            "output.merge",
            "only applies to method = \"lora\"",
        );
        if let Some(x) = &self.xtf {
            xtf(x, &mut c);
        }
        if let Some(m) = &self.mask {
            mask(m, self.xtf.as_ref().is_some_and(|x| x.enabled), &mut c);
        }
        if let Some(e) = &self.eval {
            eval(e, &mut c);
        }
        match c.0.split_first() {
            None => Ok(()),
            Some(((key, msg), rest)) => {
                let mut msg = msg.clone();
                for (k, m) in rest {
                    msg.push_str(&format!("; also {k}: {m}"));
                }
                Err(Error::Config {
                    file: self.source.clone(),
                    key: key.clone(),
                    msg,
                })
            }
        }
    }
}

fn model(m: &ModelSection, c: &mut Checks) {
    c.check(
        DeviceSpec::parse(&m.device).is_some(),
        "model.device",
        format!("expected cpu, cuda, cuda:N or metal, got {:?}", m.device),
    );
    c.check(!m.path.is_empty(), "model.path", "must not be empty");
}

fn data(d: &DataSection, c: &mut Checks) {
    c.check(
        d.template.contains("{prompt}"),
        "data.template",
        "must contain {prompt}",
    );
    c.check(d.limit != Some(0), "data.limit", "must be >= 1");
    c.check(
        d.max_seq_len >= 2,
        "data.max_seq_len",
        format!("must be >= 2, got {}", d.max_seq_len),
    );
}

fn train(t: &TrainSection, c: &mut Checks) {
    c.non_negative(t.lr, "train.lr", true, "must be > 0");
    c.check(t.epochs >= 1, "train.epochs", "must be >= 1");
    c.check(t.max_steps != Some(0), "train.max_steps", "must be >= 1");
    c.check(
        t.micro_batch_size >= 1,
        "train.micro_batch_size",
        "must be >= 1",
    );
    c.check(t.grad_accum >= 1, "train.grad_accum", "must be >= 1");
    c.check(t.log_steps >= 1, "train.log_steps", "must be >= 1");
    c.check(t.eval_steps != Some(0), "train.eval_steps", "must be >= 1");
    c.check(
        t.max_skipped_steps >= 1,
        "train.max_skipped_steps",
        "must be >= 1",
    );
    c.check(
        matches!(t.zero, 0 | 2),
        "train.zero",
        format!(
            "must be 0 (plain data parallel) or 2 (ZeRO-2), got {}",
            t.zero
        ),
    );
    c.non_negative(t.weight_decay, "train.weight_decay", false, "must be >= 0");
    c.non_negative(
        t.max_grad_norm,
        "train.max_grad_norm",
        false,
        "must be >= 0 (0 disables clipping)",
    );
    for (key, b) in [("train.beta1", t.beta1), ("train.beta2", t.beta2)] {
        c.check(
            (0.0..1.0).contains(&b),
            key,
            format!("must be in [0, 1), got {b}"),
        );
    }
    c.non_negative(t.eps, "train.eps", true, "must be > 0");
}

fn lora(l: &LoraSection, c: &mut Checks) {
    c.check(l.r >= 1, "lora.r", "must be >= 1");
    c.non_negative(l.alpha, "lora.alpha", true, "must be > 0");
    c.check(
        (0.0..1.0).contains(&l.dropout),
        "lora.dropout",
        format!("must be in [0, 1), got {}", l.dropout),
    );
    c.check(
        !l.target_modules.is_empty(),
        "lora.target_modules",
        "must not be empty",
    );
    for m in &l.target_modules {
        c.check(
            KNOWN_MODULES.contains(&m.as_str()),
            "lora.target_modules",
            format!(
                "the model has no module {m:?} (known: {})",
                KNOWN_MODULES.join(", ")
            ),
        );
    }
}

fn xtf(x: &XtfSection, c: &mut Checks) {
    c.check(x.batch_size >= 1, "xtf.batch_size", "must be >= 1");
    c.non_negative(x.ri.iqr_factor, "xtf.ri.iqr_factor", false, "must be >= 0");
    match &x.ri.layers {
        Layers::Named(s) => c.check(
            s == "all",
            "xtf.ri.layers",
            format!("expected \"all\" or a list of layer indices, got {s:?}"),
        ),
        Layers::List(v) => c.check(!v.is_empty(), "xtf.ri.layers", "must not be an empty list"),
    }
    for (key, share) in [
        ("xtf.ri.max_share", x.ri.max_share),
        ("xtf.kn.max_share", x.kn.max_share),
        ("xtf.tr.max_share", x.tr.max_share),
    ] {
        if let Some(s) = share {
            c.check(
                s > 0.0 && s <= 1.0,
                key,
                format!("must be in (0, 1], got {s}"),
            );
        }
    }
    c.check(
        x.kn.threshold > 0.0 && x.kn.threshold < 1.0,
        "xtf.kn.threshold",
        format!("must be in (0, 1), got {}", x.kn.threshold),
    );
    c.check(
        x.tr.classes >= 2,
        "xtf.tr.classes",
        format!("must be >= 2, got {}", x.tr.classes),
    );
    c.non_negative(x.tr.cut_share, "xtf.tr.cut_share", true, "must be > 0");
    if let Some(w) = &x.tr.domain_words {
        c.check(
            w.iter().any(|s| !s.trim().is_empty()),
            "xtf.tr.domain_words",
            "must hold at least one non-empty word",
        );
    }
    c.check(
        x.tr.filter_class < x.tr.classes,
        "xtf.tr.filter_class",
        format!(
            "must be < classes ({}), got {}",
            x.tr.classes, x.tr.filter_class
        ),
    );
}

fn mask(m: &MaskSection, xtf_enabled: bool, c: &mut Checks) {
    c.check(
        m.keep_ratio > 0.0 && m.keep_ratio <= 1.0,
        "mask.keep_ratio",
        format!("must be in (0, 1], got {}", m.keep_ratio),
    );
    let needs_ref = matches!(
        m.strategy,
        Strategy::Slm | Strategy::TokenClean | Strategy::DataFilter
    );
    c.check(
        !needs_ref || m.reference.is_some(),
        "mask.reference",
        format!("strategy {:?} needs a reference model", m.strategy),
    );
    c.check(
        m.strategy != Strategy::Sidecar || m.sidecar.is_some(),
        "mask.sidecar",
        "strategy \"sidecar\" needs a sidecar file",
    );
    c.check(
        m.strategy == Strategy::Xtf || !xtf_enabled,
        "mask.strategy",
        format!(
            "is {:?} but [xtf] is enabled; set xtf.enabled = false or strategy = \"xtf\"",
            m.strategy
        ),
    );
}

fn eval(e: &EvalSection, c: &mut Checks) {
    c.check(e.batch_size >= 1, "eval.batch_size", "must be >= 1");
    c.check(!e.tasks.is_empty(), "eval.tasks", "must not be empty");
    for (i, t) in e.tasks.iter().enumerate() {
        let key = |k: &str| format!("eval.tasks[{i}].{k}");
        c.check(t.n_samples >= 1, &key("n_samples"), "must be >= 1");
        c.check(
            t.max_new_tokens >= 1,
            &key("max_new_tokens"),
            "must be >= 1",
        );
        c.non_negative(t.temperature, &key("temperature"), false, "must be >= 0");
        c.check(
            t.top_p.is_none_or(|p| p > 0.0 && p <= 1.0),
            &key("top_p"),
            "must be in (0, 1]",
        );
        c.check(
            t.n_samples == 1 || t.temperature > 0.0,
            &key("temperature"),
            "n_samples > 1 needs temperature > 0 (greedy samples are identical)",
        );
        c.check(
            t.k.iter().all(|&k| k >= 1),
            &key("k"),
            "every k must be >= 1",
        );
        c.non_negative(t.timeout_s, &key("timeout_s"), true, "must be > 0");
        if let Some(tpl) = &t.template {
            c.check(
                tpl.contains("{prompt}"),
                &key("template"),
                "must contain {prompt}",
            );
        }
    }
}
