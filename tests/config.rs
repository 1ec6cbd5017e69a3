//! Config parsing: every shipped config loads; every bad key or value is an
//! error naming the key and the file.

use std::path::Path;
use xtf_train::config::{Config, Layers, Method};

const MINIMAL: &str = r#"
[model]
path = "m"
[data]
train = "t.jsonl"
[output]
dir = "o"
"#;

fn parse(text: &str) -> Result<Config, String> {
    Config::parse(text, Path::new("cfg/x.toml")).map_err(|e| e.to_string())
}

#[test]
fn every_shipped_config_loads() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "toml") {
            Config::load(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            n += 1;
        }
    }
    assert!(n >= 1);
}

#[test]
fn defaults_are_the_documented_ones() {
    let c = parse(MINIMAL).unwrap();
    assert_eq!(c.train.method, Method::Lora);
    assert_eq!(
        (c.train.micro_batch_size, c.train.grad_accum, c.train.epochs),
        (4, 1, 1)
    );
    assert_eq!(c.train.lr, 2e-4);
    assert_eq!((c.lora.r, c.lora.alpha), (8, 16.0));
    assert_eq!(c.lora.target_modules.len(), 7);
    assert_eq!(c.data.template, "{prompt}\n");
    assert!(c.xtf.is_none() && !c.xtf_enabled());
    let x = parse(&format!("{MINIMAL}\n[xtf]\n")).unwrap();
    let x = x.xtf.unwrap();
    assert!(x.enabled && x.ri.enabled && x.kn.enabled && x.tr.enabled);
    assert_eq!(
        (
            x.kn.threshold,
            x.ri.iqr_factor,
            x.tr.classes,
            x.tr.filter_class
        ),
        (0.05, 1.0, 3, 1)
    );
    assert_eq!(x.ri.layers, Layers::Named("all".into()));
}

#[test]
fn unknown_key_names_key_and_file() {
    let e = parse(&MINIMAL.replace("[output]", "[train]\nlrr = 1\n[output]")).unwrap_err();
    assert!(
        e.contains("cfg/x.toml") && e.contains("lrr") && e.contains("train"),
        "{e}"
    );
    let e = parse(&format!("{MINIMAL}\n[bogus]\nx = 1\n")).unwrap_err();
    assert!(e.contains("bogus"), "{e}");
}

#[test]
fn wrong_type_names_key_and_line() {
    let e = parse(&MINIMAL.replace("[output]", "[train]\nlr = \"fast\"\n[output]")).unwrap_err();
    assert!(
        e.contains("cfg/x.toml: train.lr:") && e.contains("line"),
        "{e}"
    );
}

#[test]
fn impossible_values_are_rejected_with_their_key() {
    let cases = [
        ("[train]\nlr = 0.0", "train.lr"),
        ("[train]\nlr = -1e-3", "train.lr"),
        ("[lora]\nr = 0", "lora.r"),
        (
            "[lora]\ntarget_modules = [\"q_proj\", \"qkv\"]",
            "lora.target_modules",
        ),
        ("[train]\nmicro_batch_size = 0", "train.micro_batch_size"),
        ("[xtf.kn]\nthreshold = 1.5", "xtf.kn.threshold"),
        (
            "[xtf.tr]\nclasses = 3\nfilter_class = 3",
            "xtf.tr.filter_class",
        ),
        ("[xtf.ri]\nlayers = \"some\"", "xtf.ri.layers"),
    ];
    for (extra, key) in cases {
        let e = parse(&MINIMAL.replace("[output]", &format!("{extra}\n[output]"))).unwrap_err();
        assert!(
            e.starts_with(&format!("cfg/x.toml: {key}:")),
            "{extra:?} -> {e}"
        );
    }
    let e = parse(&MINIMAL.replace("path = \"m\"", "path = \"m\"\ndevice = \"tpu\"")).unwrap_err();
    assert!(e.contains("model.device"), "{e}");
}

/// Issue 25: no float key takes NaN or an infinity (TOML writes them `nan`,
/// `inf`, `-inf`), each reported with its key and value.
#[test]
fn float_keys_reject_nan_and_infinities() {
    let keys = [
        ("train", "lr"),
        ("train", "weight_decay"),
        ("train", "max_grad_norm"),
        ("train", "beta1"),
        ("train", "beta2"),
        ("train", "eps"),
        ("lora", "alpha"),
        ("lora", "dropout"),
        ("xtf.ri", "iqr_factor"),
        ("xtf.ri", "max_share"),
        ("xtf.kn", "threshold"),
        ("xtf.kn", "max_share"),
        ("xtf.tr", "cut_share"),
        ("xtf.tr", "max_share"),
        ("mask", "keep_ratio"),
    ];
    for (section, key) in keys {
        for v in ["nan", "inf", "-inf"] {
            let extra = format!("[{section}]\n{key} = {v}");
            let e = parse(&MINIMAL.replace("[output]", &format!("{extra}\n[output]"))).unwrap_err();
            let v_shown = match v {
                "nan" => "NaN",
                other => other,
            };
            assert!(
                e.starts_with(&format!("cfg/x.toml: {section}.{key}:"))
                    && e.contains(&format!("got {v_shown}")),
                "{section}.{key} = {v} -> {e}"
            );
        }
    }
    let task = "[eval]\n[[eval.tasks]]\nname = \"gsm8k\"\npath = \"t.jsonl\"\n";
    for (key, v) in [
        ("temperature", "inf"),
        ("timeout_s", "inf"),
        ("top_p", "nan"),
    ] {
        let text = format!("{MINIMAL}\n{task}{key} = {v}\n");
        let e = parse(&text).unwrap_err();
        assert!(
            e.contains(&format!("eval.tasks[0].{key}")),
            "{key} = {v} -> {e}"
        );
    }
}

#[test]
fn missing_required_section_is_named() {
    let e = parse("[model]\npath = \"m\"\n[output]\ndir = \"o\"\n").unwrap_err();
    assert!(e.contains("cfg/x.toml") && e.contains("data"), "{e}");
}

#[test]
fn sweep_runner_writes_valid_configs_for_every_method() {
    use xtf_train::config::Strategy;
    let has_tomllib = std::process::Command::new("python3")
        .args(["-c", "import tomllib"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_tomllib {
        eprintln!("skipped: python3 >= 3.11 (tomllib) not found");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = tempfile::tempdir().unwrap();
    let o = std::process::Command::new("python3")
        .arg(root.join("scripts/sweep.py"))
        .args([
            "--config",
            "configs/math.toml",
            "--dry-run",
            "--models",
            "m/a,m/b",
        ])
        .args(["--set", "train.max_steps=7", "--out"])
        .arg(out.path())
        .current_dir(root)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let want = [
        ("base", Strategy::None),
        ("normal", Strategy::None),
        ("double_epochs", Strategy::None),
        ("data_filter", Strategy::DataFilter),
        ("slm", Strategy::Slm),
        ("token_clean", Strategy::TokenClean),
        ("xtf", Strategy::Xtf),
    ];
    for model in ["m_a", "m_b"] {
        let dir = out.path().join("math").join(model);
        for (method, strategy) in want {
            let c = Config::load(&dir.join(method).join("sweep.toml")).unwrap();
            assert_eq!(c.strategy(), strategy, "{model}/{method}");
            assert_eq!(c.model.path, model.replace('_', "/"));
            assert_eq!(c.output.dir, dir.join(method));
            let steps = if method == "double_epochs" { 14 } else { 7 };
            assert_eq!(c.train.max_steps, Some(steps), "{method}");
            assert!(c.eval.is_some_and(|e| e.after_train && !e.tasks.is_empty()));
            if matches!(method, "data_filter" | "slm" | "token_clean") {
                let m = c.mask.unwrap();
                assert_eq!(
                    m.reference.unwrap(),
                    dir.join("reference").display().to_string()
                );
                assert_eq!(m.keep_ratio, 0.6);
            }
        }
        let r = Config::load(&dir.join("reference/sweep.toml")).unwrap();
        assert_eq!(
            (r.strategy(), r.train.max_steps),
            (Strategy::None, Some(100))
        );
    }
}

#[test]
fn authors_preset_sets_defaults_and_explicit_keys_win() {
    use xtf_train::config::{Preset, RiScope};
    // Paper preset (the default): no caps, dataset-level RI fence.
    let p = parse(&format!("{MINIMAL}\n[xtf]\n")).unwrap().xtf.unwrap();
    assert_eq!(p.preset, Preset::Paper);
    assert_eq!(
        (p.ri.scope, p.ri.iqr_factor, p.tr.classes),
        (RiScope::Dataset, 1.0, 3)
    );
    assert_eq!(
        (p.ri.max_share, p.kn.max_share, p.tr.max_share),
        (None, None, None)
    );
    // Authors: the released code's values (spec "Per-example caps").
    let a = parse(&format!("{MINIMAL}\n[xtf]\npreset = \"authors\"\n"))
        .unwrap()
        .xtf
        .unwrap();
    assert_eq!(
        (a.ri.scope, a.ri.iqr_factor, a.tr.classes),
        (RiScope::Example, 1.5, 5)
    );
    assert_eq!(
        (a.ri.max_share, a.kn.max_share, a.tr.max_share),
        (Some(0.05), Some(0.10), Some(0.05))
    );
    // Keys set in the file win, in sub-tables too; untouched ones keep the preset's.
    let o = parse(&format!(
        "{MINIMAL}\n[xtf]\npreset = \"authors\"\n[xtf.ri]\niqr_factor = 2.0\n[xtf.kn]\nmax_share = 0.5\nthreshold = 0.1\n"
    ))
    .unwrap()
    .xtf
    .unwrap();
    assert_eq!(
        (o.ri.iqr_factor, o.ri.scope, o.ri.max_share),
        (2.0, RiScope::Example, Some(0.05))
    );
    assert_eq!((o.kn.max_share, o.kn.threshold), (Some(0.5), 0.1));
    assert_eq!((o.tr.classes, o.tr.max_share), (5, Some(0.05)));
    // Bad values are still errors naming the key.
    for (extra, key) in [
        ("[xtf.kn]\nmax_share = 0.0\n", "xtf.kn.max_share"),
        ("[xtf.tr]\nmax_share = 1.5\n", "xtf.tr.max_share"),
        ("[xtf.ri]\nscope = \"batch\"\n", "xtf.ri.scope"),
    ] {
        let e = parse(&format!("{MINIMAL}\n[xtf]\npreset = \"authors\"\n{extra}")).unwrap_err();
        assert!(e.contains(key) && e.contains("cfg/x.toml"), "{e}");
    }
    let e = parse(&format!("{MINIMAL}\n[xtf]\npreset = \"mine\"\n")).unwrap_err();
    assert!(e.contains("xtf.preset"), "{e}");
}
