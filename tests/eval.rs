//! `xtf-train eval` and the after-training hook, end to end through the
//! binary: accuracy against references whose correctness is known up front,
//! HumanEval pass@k against the formula worked by hand, the real-data
//! loaders, chat-template prompting, seeded sampling, and bad inputs.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;
use xtf_train::data::tokenizer::Tok;
use xtf_train::eval::gen::{generate, GenOptions};
use xtf_train::model::{Model, Trainable};

const TEMPLATE: &str = "Question: {prompt}\nAnswer: ";

use crate::common;
use common::{bin, stderr};

/// The tiny model and data, created once (shared by every test here).
fn tiny() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("eval-tiny");
        if !dir.join("model/model.safetensors").is_file() || !dir.join("data/test.jsonl").is_file()
        {
            let out = bin()
                .args(["init-tiny", "--out"])
                .arg(&dir)
                .output()
                .unwrap();
            assert!(out.status.success(), "init-tiny failed:\n{}", stderr(&out));
        }
        dir
    })
}

/// The repository's `../shared/data/<rel>`, or None (with a message) when absent.
fn shared(rel: &str) -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data")
        .join(rel);
    if p.exists() {
        Some(p)
    } else {
        eprintln!("skipping: {} not present", p.display());
        None
    }
}

fn python_ok() -> bool {
    let ok = xtf_train::eval::sandbox::python_available(Path::new("python3"));
    if !ok {
        eprintln!("skipping: python3 not available");
    }
    ok
}

/// A fresh test directory.
fn workdir(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("eval-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A config over the tiny model with `body` appended (the [eval] section and
/// more); output in `dir/out`.
fn config(dir: &Path, head: &str, body: &str) -> PathBuf {
    let t = tiny();
    let text = format!(
        "[model]\npath = {:?}\ncpu_threads = 1\n[data]\ntrain = {:?}\ntemplate = {:?}\n{head}\n[output]\ndir = {:?}\n{body}\n",
        t.join("model").display().to_string(),
        t.join("data/train.jsonl").display().to_string(),
        TEMPLATE,
        dir.join("out").display().to_string(),
    );
    let p = dir.join("c.toml");
    std::fs::write(&p, text).unwrap();
    p
}

fn run(cfg: &Path, args: &[&str]) -> Output {
    bin()
        .arg("--config")
        .arg(cfg)
        .arg("--quiet")
        .args(args)
        .output()
        .unwrap()
}

fn run_ok(cfg: &Path, args: &[&str]) {
    let o = run(cfg, args);
    assert!(o.status.success(), "{}", stderr(&o));
}

fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn samples(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("out/eval_samples.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn jsonl(path: &Path, rows: &[serde_json::Value]) {
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(path, text).unwrap();
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-12
}

#[test]
fn accuracy_is_half_when_half_the_references_are_the_greedy_answers() {
    let t = tiny();
    let dir = workdir("half");
    // Greedy continuations, one prompt at a time, exactly as `generate` builds them.
    let model_dir = t.join("model");
    let tok = Tok::load(&model_dir).unwrap();
    let model = Model::load(
        &model_dir,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
        Trainable::Frozen,
    )
    .unwrap();
    let opts = GenOptions {
        max_new_tokens: 40,
        ..Default::default()
    };
    let test = std::fs::read_to_string(t.join("data/test.jsonl")).unwrap();
    let (mut rows, mut greedy) = (Vec::new(), Vec::new());
    for line in test.lines() {
        let q = serde_json::from_str::<serde_json::Value>(line).unwrap()["prompt"]
            .as_str()
            .unwrap()
            .to_string();
        let mut ids: Vec<u32> = tok.bos.into_iter().collect();
        ids.extend(tok.encode(&TEMPLATE.replace("{prompt}", &q)).unwrap());
        let text = generate(&model, &tok, &[ids], &opts).unwrap()[0]
            .text
            .clone();
        let Some(answer) = xtf_train::eval::tasks::extract_gsm8k(&text) else {
            continue;
        };
        // Even rows: the model's own answer; odd rows: a different number.
        let reference = match rows.len() % 2 {
            0 => answer,
            _ => format!("{answer}7"),
        };
        rows.push(serde_json::json!({"question": q, "answer": format!("steps\n#### {reference}")}));
        greedy.push(text);
        if rows.len() == 6 {
            break;
        }
    }
    assert_eq!(rows.len(), 6, "too few tiny outputs hold a number");
    let task = dir.join("task.jsonl");
    jsonl(&task, &rows);
    let cfg = config(
        &dir,
        "",
        &format!(
            "[eval]\nbatch_size = 4\n[[eval.tasks]]\nname = \"gsm8k\"\npath = {:?}\nmax_new_tokens = 40\n",
            task.display().to_string()
        ),
    );
    run_ok(&cfg, &["eval"]);
    let r = &read_json(&dir.join("out/eval.json"))["tasks"][0];
    assert_eq!(r["problems"], 6);
    assert_eq!(r["samples"], 6);
    assert_eq!(r["correct"], 3);
    assert!(close(r["accuracy"].as_f64().unwrap(), 0.5), "{r}");
    let s = samples(&dir);
    assert_eq!(s.len(), 6);
    for (i, rec) in s.iter().enumerate() {
        // Batched, left-padded generation gives the one-at-a-time text.
        assert_eq!(rec["output"].as_str().unwrap(), greedy[i], "sample {i}");
        assert_eq!(rec["correct"], i % 2 == 0, "sample {i}");
        assert_eq!(rec["id"], format!("gsm8k-{i}"));
        let q = rows[i]["question"].as_str().unwrap();
        assert_eq!(rec["prompt"], TEMPLATE.replace("{prompt}", q));
    }
}

/// HumanEval completions: canonical, or broken in the ways model output
/// breaks (an exception, a syntax error, an endless loop).
const BROKEN: [&str; 3] = [
    "    raise ValueError('broken')\n",
    "    return (\n",
    "    while True:\n        pass\n",
];

#[test]
fn humaneval_pass_at_k_from_completions_matches_the_formula() {
    let Some(he) = shared("humaneval/HumanEval.jsonl.gz") else {
        return;
    };
    if !python_ok() {
        return;
    }
    let items = xtf_train::eval::tasks::load_humaneval(&he).unwrap();
    let dir = workdir("humaneval");
    // Correct samples per problem, n = 4 each: c = 3, 4, 0, 2.
    let plan: [(usize, usize); 4] = [(4, 3), (4, 4), (4, 0), (4, 2)];
    let mut rows = Vec::new();
    for (p, &(n, c)) in plan.iter().enumerate() {
        let it = &items[p];
        let comps: Vec<String> = (0..n)
            .map(|j| {
                if j < c {
                    it.reference.clone()
                } else {
                    BROKEN[j % BROKEN.len()].to_string()
                }
            })
            .collect();
        if p == 3 {
            rows.push(serde_json::json!({"id": it.id, "completions": comps}));
        } else {
            // human-eval's samples.jsonl layout: one line per sample.
            for c in comps {
                rows.push(serde_json::json!({"task_id": it.id, "completion": c}));
            }
        }
    }
    let comp = dir.join("completions.jsonl");
    jsonl(&comp, &rows);
    // Generous limits: only the endless loop may time out, even on a
    // machine starved by parallel tests.
    let cfg = config(
        &dir,
        "",
        &format!(
            "[eval]\n[[eval.tasks]]\nname = \"humaneval\"\npath = {:?}\nlimit = 4\nk = [1, 2, 5]\ntimeout_s = 5.0\n",
            he.display().to_string()
        ),
    );
    run_ok(&cfg, &["eval", "--completions", comp.to_str().unwrap()]);
    let r = &read_json(&dir.join("out/eval.json"))["tasks"][0];
    // pass@1 = mean c/n; pass@2 = mean 1 - C(n-c,2)/C(n,2):
    // (1 + 1 + 0 + (1 - 1/6)) / 4; pass@5 needs n >= 5.
    let p1 = (3.0 / 4.0 + 1.0 + 0.0 + 2.0 / 4.0) / 4.0;
    let p2 = (1.0 + 1.0 + 0.0 + (1.0 - 1.0 / 6.0)) / 4.0;
    assert!(close(r["pass_at_k"]["1"].as_f64().unwrap(), p1), "{r}");
    assert!(close(r["pass_at_k"]["2"].as_f64().unwrap(), p2), "{r}");
    assert!(r["pass_at_k"].get("5").is_none());
    let why = r["pass_at_k_not_reported"]["5"].as_str().unwrap();
    assert!(why.contains("n >= 5"), "{why}");
    assert_eq!(r["samples"], 16);
    assert_eq!(r["correct"], 9);
    assert_eq!(r["outcomes"]["passed"], 9);
    assert!(r["outcomes"]["timed_out"].as_u64().unwrap() >= 1, "{r}");
    let s = samples(&dir);
    assert_eq!(s.len(), 16);
    let hung = s.iter().find(|x| x["output"] == BROKEN[2]).unwrap();
    assert_eq!(hung["outcome"], "timed_out");
    assert_eq!(hung["correct"], false);

    // Canonical solutions pass everything; empty bodies pass nothing.
    for (body, want) in [(None, 1.0), (Some("    pass\n"), 0.0)] {
        let rows: Vec<_> = items[..10]
            .iter()
            .map(|it| {
                let c = body.map_or(it.reference.clone(), str::to_string);
                serde_json::json!({"id": it.id, "completion": c})
            })
            .collect();
        jsonl(&comp, &rows);
        let cfg = config(
            &dir,
            "",
            &format!(
                "[eval]\n[[eval.tasks]]\nname = \"humaneval\"\npath = {:?}\nlimit = 10\nk = [1]\ntimeout_s = 30.0\n",
                he.display().to_string()
            ),
        );
        run_ok(&cfg, &["eval", "--completions", comp.to_str().unwrap()]);
        let r = &read_json(&dir.join("out/eval.json"))["tasks"][0];
        assert_eq!(r["pass_at_k"]["1"].as_f64().unwrap(), want, "{r}");
    }
}

#[test]
fn real_pubmedqa_and_gsm8k_load_and_score_through_eval() {
    let (Some(pq), Some(gsm)) = (shared("pubmedqa/ori_pqal.json"), shared("gsm8k/test.jsonl"))
    else {
        return;
    };
    let dir = workdir("real");
    // The 500 test ids, sorted (the loader's order), with their labels.
    let truth: std::collections::BTreeMap<String, String> = serde_json::from_str(
        &std::fs::read_to_string(pq.with_file_name("test_ground_truth.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(truth.len(), 500);
    let wrong = |l: &str| if l == "yes" { "no" } else { "yes" };
    let mut rows: Vec<_> = truth
        .iter()
        .enumerate()
        .map(|(i, (id, l))| {
            let a = if i % 5 < 2 { l.as_str() } else { wrong(l) };
            serde_json::json!({"id": id, "completion": format!("Reasoning, no doubt.\nAnswer: {a}")})
        })
        .collect();
    // GSM8K: gold numbers read by hand from the first 10 answers; 7 right.
    let gold: Vec<String> = std::fs::read_to_string(&gsm)
        .unwrap()
        .lines()
        .take(10)
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let a = v["answer"].as_str().unwrap();
            a.split("####").last().unwrap().trim().replace(',', "")
        })
        .collect();
    for (i, g) in gold.iter().enumerate() {
        let out = if i < 7 {
            format!("So {g} in all.")
        } else {
            format!("#### {g}1")
        };
        rows.push(serde_json::json!({"id": format!("gsm8k-{i}"), "completion": out}));
    }
    let comp = dir.join("completions.jsonl");
    jsonl(&comp, &rows);
    let tasks = format!(
        "[eval]\n[[eval.tasks]]\nname = \"pubmedqa\"\npath = {:?}\n[[eval.tasks]]\nname = \"gsm8k\"\npath = {:?}\nlimit = 10\n",
        pq.display().to_string(),
        gsm.display().to_string()
    );
    let cfg = config(&dir, "", &tasks);
    run_ok(&cfg, &["eval", "--completions", comp.to_str().unwrap()]);
    let r = read_json(&dir.join("out/eval.json"));
    let (p, g) = (&r["tasks"][0], &r["tasks"][1]);
    assert_eq!(
        (p["name"].as_str(), p["problems"].as_u64()),
        (Some("pubmedqa"), Some(500))
    );
    assert_eq!(p["correct"], 200);
    assert!(close(p["accuracy"].as_f64().unwrap(), 0.4), "{p}");
    assert_eq!(
        (g["name"].as_str(), g["problems"].as_u64()),
        (Some("gsm8k"), Some(10))
    );
    assert!(close(g["accuracy"].as_f64().unwrap(), 0.7), "{g}");

    // The model path on real prompts: the template wraps the loader's prompt.
    let tasks = format!(
        "[eval]\n[[eval.tasks]]\nname = \"pubmedqa\"\npath = {:?}\nlimit = 2\nmax_new_tokens = 4\n[[eval.tasks]]\nname = \"gsm8k\"\npath = {:?}\nlimit = 2\nmax_new_tokens = 4\n",
        pq.display().to_string(),
        gsm.display().to_string()
    );
    let cfg = config(&dir, "", &tasks);
    run_ok(&cfg, &["eval"]);
    let s = samples(&dir);
    assert_eq!(s.len(), 4);
    let first_id = truth.keys().next().unwrap();
    assert_eq!(&s[0]["id"], first_id.as_str());
    let p0 = s[0]["prompt"].as_str().unwrap();
    assert!(
        p0.starts_with("Question: Abstract: ") && p0.ends_with("\nAnswer:\nAnswer: "),
        "{p0}"
    );
    assert_eq!(s[0]["reference"], truth[first_id].as_str());
    let q0: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(&gsm)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        s[2]["prompt"],
        TEMPLATE.replace("{prompt}", q0["question"].as_str().unwrap())
    );
    assert_eq!(s[2]["reference"], gold[0].as_str());
}

#[test]
fn after_train_hook_evaluates_the_trained_model() {
    let t = tiny();
    let dir = workdir("after");
    let task = format!(
        "[eval]\n[[eval.tasks]]\nname = \"gsm8k\"\npath = {:?}\nlimit = 4\nmax_new_tokens = 24\n",
        t.join("data/test.jsonl").display().to_string()
    );
    let head = "[train]\nmax_steps = 3\nmicro_batch_size = 4\nlr = 5e-3\n";
    let cfg = config(&dir, head, &task);
    run_ok(&cfg, &[]);
    let out = dir.join("out");
    assert!(out.join("adapter_model.safetensors").is_file());
    let r = read_json(&out.join("eval.json"));
    assert!(
        r["evaluated"]
            .as_str()
            .unwrap()
            .contains("trained in memory"),
        "{r}"
    );
    assert_eq!(r["tasks"][0]["problems"], 4);
    let after: Vec<_> = samples(&dir).iter().map(|s| s["output"].clone()).collect();
    // The in-memory model is the saved adapter: `eval --adapter` agrees.
    run_ok(&cfg, &["eval", "--adapter", out.to_str().unwrap()]);
    let again: Vec<_> = samples(&dir).iter().map(|s| s["output"].clone()).collect();
    assert_eq!(after, again);
    // ... and it differs from the base model somewhere (training changed it).
    run_ok(&cfg, &["eval"]);
    let base: Vec<_> = samples(&dir).iter().map(|s| s["output"].clone()).collect();
    assert_ne!(after, base, "training did not change any output");
}

#[test]
fn sampling_is_seeded_per_problem_and_sample_whatever_the_batch() {
    let t = tiny();
    let dir = workdir("seeded");
    let outputs = |batch: usize, seed: u64| {
        let task = format!(
            "[eval]\nbatch_size = {batch}\n[[eval.tasks]]\nname = \"gsm8k\"\npath = {:?}\nlimit = 3\nn_samples = 3\ntemperature = 1.0\nseed = {seed}\nmax_new_tokens = 12\nk = [1, 3]\n",
            t.join("data/test.jsonl").display().to_string()
        );
        let cfg = config(&dir, "", &task);
        run_ok(&cfg, &["eval"]);
        samples(&dir)
            .iter()
            .map(|s| s["output"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    let a = outputs(2, 5);
    assert_eq!(a.len(), 9);
    assert_eq!(a, outputs(9, 5));
    assert_ne!(a, outputs(2, 6), "the seed must change the samples");
    let distinct: std::collections::HashSet<_> = a[..3].iter().collect();
    assert!(
        distinct.len() > 1,
        "samples of one problem are all equal: {a:?}"
    );
}

#[test]
fn chat_template_renders_the_prompt_as_a_user_turn() {
    let t = tiny();
    let dir = workdir("chat");
    // A copy of the tiny model whose tokenizer_config has a chat template.
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["model.safetensors", "config.json", "tokenizer.json"] {
        std::fs::copy(t.join("model").join(f), model.join(f)).unwrap();
    }
    let mut tc = read_json(&t.join("model/tokenizer_config.json"));
    tc["chat_template"] = "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}".into();
    std::fs::write(model.join("tokenizer_config.json"), tc.to_string()).unwrap();
    let task = dir.join("task.jsonl");
    jsonl(
        &task,
        &[serde_json::json!({"question": "Two plus two?", "answer": "#### 4"})],
    );
    let body = format!(
        "[eval]\n[[eval.tasks]]\nname = \"gsm8k\"\npath = {:?}\nmax_new_tokens = 2\n",
        task.display().to_string()
    );
    let cfg = config(&dir, "chat_template = true\nsystem = \"Be brief.\"", &body);
    run_ok(&cfg, &["eval", "--model", model.to_str().unwrap()]);
    let s = samples(&dir);
    // BOS is an id, not text: the template's literal `<s>` is cut.
    assert_eq!(
        s[0]["prompt"],
        "<system>Be brief.\n<user>Two plus two?\n<assistant>"
    );
}

/// The command fails with one `error:` line containing every needle, and
/// writes nothing.
fn fails(cfg: &Path, args: &[&str], needles: &[&str]) {
    let o = run(cfg, args);
    let err = stderr(&o);
    assert!(!o.status.success(), "should fail: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    for n in needles {
        assert!(lines[0].contains(n), "{n:?} not in {err}");
    }
    let out = cfg.parent().unwrap().join("out");
    assert!(!out.join("eval.json").exists() && !out.join("eval_samples.jsonl").exists());
    assert!(
        !out.join("adapter_model.safetensors").exists(),
        "trained before failing"
    );
}

#[test]
fn bad_inputs_fail_with_one_line_naming_the_culprit() {
    let t = tiny();
    let dir = workdir("bad");
    let task = |name: &str, path: &Path| {
        format!(
            "[eval]\n[[eval.tasks]]\nname = {name:?}\npath = {:?}\nmax_new_tokens = 4\n",
            path.display().to_string()
        )
    };
    // A missing task file: named with its key, before any training.
    let missing = dir.join("nope.jsonl");
    let cfg = config(&dir, "[train]\nmax_steps = 1\n", &task("gsm8k", &missing));
    fails(&cfg, &[], &["eval.tasks[0].path", "nope.jsonl"]);
    fails(&cfg, &["eval"], &["eval.tasks[0].path", "nope.jsonl"]);
    // A malformed line, and a row without its answer.
    let bad = dir.join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"question\": \"a\", \"answer\": \"#### 1\"}\n{oops\n",
    )
    .unwrap();
    let cfg = config(&dir, "", &task("gsm8k", &bad));
    fails(&cfg, &["eval"], &["bad.jsonl:2", "invalid JSON"]);
    std::fs::write(
        &bad,
        "{\"question\": \"a\", \"answer\": \"#### 1\"}\n{\"question\": \"b\"}\n",
    )
    .unwrap();
    fails(&cfg, &["eval"], &["bad.jsonl:2", "\"answer\""]);
    std::fs::write(&bad, "{\"question\": \"a\", \"answer\": \"no number\"}\n").unwrap();
    fails(&cfg, &["eval"], &["bad.jsonl:1", "####"]);
    // PubMedQA without its test split's ids beside it.
    let pq = dir.join("ori_pqal.json");
    std::fs::write(&pq, "{}").unwrap();
    let cfg = config(&dir, "", &task("pubmedqa", &pq));
    fails(&cfg, &["eval"], &["test_ground_truth.json"]);
    // A completions file: a bad line, and one that covers only part of the task.
    let good = dir.join("good.jsonl");
    jsonl(
        &good,
        &[
            serde_json::json!({"question": "a", "answer": "#### 1"}),
            serde_json::json!({"question": "b", "answer": "#### 2"}),
        ],
    );
    let cfg = config(&dir, "", &task("gsm8k", &good));
    let comp = dir.join("comp.jsonl");
    std::fs::write(
        &comp,
        "{\"id\": \"gsm8k-0\", \"completion\": \"1\"}\n{\"id\": \"gsm8k-1\"}\n",
    )
    .unwrap();
    fails(
        &cfg,
        &["eval", "--completions", comp.to_str().unwrap()],
        &["comp.jsonl:2", "completion"],
    );
    std::fs::write(&comp, "{\"id\": \"gsm8k-0\", \"completion\": \"1\"}\n").unwrap();
    fails(
        &cfg,
        &["eval", "--completions", comp.to_str().unwrap()],
        &["comp.jsonl", "gsm8k-1"],
    );
    // A Hub split missing from an offline cache: one line naming the repo.
    let cfg = config(
        &dir,
        "",
        &task("gsm8k", Path::new("hf://openai/gsm8k/main/test")),
    );
    let o = bin()
        .args(["--config", cfg.to_str().unwrap(), "--quiet", "eval"])
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", dir.join("empty-hf-home"))
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(!o.status.success() && err.contains("openai/gsm8k"), "{err}");
    assert_eq!(
        err.lines().filter(|l| l.starts_with("error:")).count(),
        1,
        "{err}"
    );
    let _ = t;
}

#[test]
fn hub_row_layouts_map_to_problems() {
    // The Hub layouts (qiaojin/PubMedQA pqa_labeled, HuggingFaceH4/MATH-500)
    // read from local JSONL files, scored through completions.
    let dir = workdir("hub-layouts");
    let pq = dir.join("pqa_labeled.jsonl");
    let ctx = |t: &str| serde_json::json!({"contexts": [t, "More."], "labels": ["A", "B"]});
    jsonl(
        &pq,
        &[
            serde_json::json!({"pubid": 111, "question": "Q1?", "context": ctx("C1."), "final_decision": "yes"}),
            serde_json::json!({"pubid": 222, "question": "Q2?", "context": ctx("C2."), "final_decision": "maybe"}),
            serde_json::json!({"pubid": 333, "question": "Q3?", "context": ctx("C3."), "final_decision": "no"}),
        ],
    );
    let math = dir.join("math.jsonl");
    jsonl(
        &math,
        &[
            serde_json::json!({"problem": "p1", "answer": "\\dfrac{3}{4}", "unique_id": "test/x/1.json"}),
            serde_json::json!({"problem": "p2", "answer": "5", "unique_id": "test/x/2.json"}),
        ],
    );
    let comp = dir.join("completions.jsonl");
    jsonl(
        &comp,
        &[
            serde_json::json!({"id": "111", "completion": "Answer: Yes."}),
            serde_json::json!({"id": "222", "completion": "Answer: no"}),
            serde_json::json!({"id": "333", "completion": "No, not at all."}),
            serde_json::json!({"id": "test/x/1.json", "completion": "so \\boxed{\\frac34}"}),
            serde_json::json!({"id": "test/x/2.json", "completion": "5 (no box)"}),
        ],
    );
    let body = format!(
        "[eval]\n[[eval.tasks]]\nname = \"pubmedqa\"\npath = {:?}\n[[eval.tasks]]\nname = \"math500\"\npath = {:?}\n",
        pq.display().to_string(),
        math.display().to_string()
    );
    let cfg = config(&dir, "", &body);
    run_ok(&cfg, &["eval", "--completions", comp.to_str().unwrap()]);
    let r = read_json(&dir.join("out/eval.json"));
    assert_eq!(r["tasks"][0]["correct"], 2, "{r}");
    assert_eq!(r["tasks"][0]["problems"], 3);
    assert_eq!(r["tasks"][1]["correct"], 1, "{r}");
    let s = samples(&dir);
    assert_eq!(
        s[0]["prompt"],
        "Abstract: C1.\nMore.\nQuestion: Q1?\nAnswer:"
    );
    assert_eq!(s[1]["extracted"], "no");
    assert_eq!(s[3]["extracted"], "\\frac34");
}
