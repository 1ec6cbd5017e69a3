//! Never silently wrong (issue 25), each case through the binary with its
//! exact outcome: exit status, the error line, which files exist and that
//! they load. The tiny model comes from the README's default run
//! (`cli::tiny_run`).

use crate::cli::{good_data, tiny_run};
use crate::common::{bin, stderr};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn tiny_model() -> PathBuf {
    tiny_run().join("runs/tiny/model")
}

/// A config over the tiny model training on `data`, output in `out`, with
/// `train` added to `[train]`; its file is named after `train`, so configs
/// in one directory do not overwrite each other.
fn config(dir: &Path, data: &Path, out: &Path, train: &str) -> PathBuf {
    let text = format!(
        "[model]\npath = {:?}\n[data]\ntrain = {:?}\ntemplate = \"Question: {{prompt}}\\nAnswer: \"\n\
         [train]\nmicro_batch_size = 1\nseed = 3\n{train}\n[lora]\ndropout = 0.1\n[output]\ndir = {:?}\n",
        tiny_model().display().to_string(),
        data.display().to_string(),
        out.display().to_string()
    );
    let name: String = train
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let p = dir.join(format!("c{name}.toml"));
    std::fs::write(&p, text).unwrap();
    p
}

fn run(cfg: &Path, extra: &[&str]) -> std::process::Output {
    bin()
        .args(["--config", cfg.to_str().unwrap(), "--quiet"])
        .args(extra)
        .output()
        .unwrap()
}

/// The one line a failed run prints last: `error: ...`.
fn error_line(o: &std::process::Output) -> String {
    let e = stderr(o);
    let errs: Vec<&str> = e.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(errs.len(), 1, "one error line expected:\n{e}");
    assert!(e.trim_end().ends_with(errs[0]), "error line not last:\n{e}");
    errs[0].to_string()
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn loads(adapter_dir: &Path) {
    let t = candle_core::safetensors::load(
        adapter_dir.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert!(!t.is_empty());
    for (name, x) in t {
        let v = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(v.iter().all(|x| x.is_finite()), "{name} not finite");
    }
}

#[test]
fn a_huge_lr_stops_with_an_error_and_writes_no_adapter() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    let cfg = config(
        d.path(),
        &good_data(d.path()),
        &out,
        "max_steps = 6\nlr = 1e29",
    );
    let o = run(&cfg, &[]);
    assert!(!o.status.success());
    let e = error_line(&o);
    assert!(
        e.contains("step 4: 3 consecutive steps with a non-finite loss or gradient")
            && e.contains("loss NaN"),
        "{e}"
    );
    assert!(stderr(&o).contains("step 2: loss NaN | grad_norm NaN: not finite; step skipped"));
    // A failed fresh run leaves no outputs — only its TensorBoard log
    // (issue 24: the curve of what went wrong, written in place), which
    // `tensorboard = false` turns off.
    assert_eq!(
        names(&out),
        ["tensorboard"],
        "a failed fresh run leaves only its log"
    );
    std::fs::remove_dir_all(&out).unwrap();
    let quiet = config(
        d.path(),
        &good_data(d.path()),
        &out,
        "max_steps = 6\nlr = 1e28",
    );
    let text = std::fs::read_to_string(&quiet).unwrap() + "tensorboard = false\n";
    std::fs::write(&quiet, text).unwrap();
    assert!(!run(&quiet, &[]).status.success());
    assert!(
        !out.exists(),
        "a failed fresh run without a log leaves no output dir"
    );

    // With a previous run's outputs there, they stay as they were.
    let good = config(d.path(), &good_data(d.path()), &out, "max_steps = 2");
    assert!(run(&good, &[]).status.success());
    let before = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    let listing = names(&out);
    let o = run(&cfg, &[]);
    assert!(!o.status.success());
    assert_eq!(names(&out), listing);
    assert_eq!(
        std::fs::read(out.join("adapter_model.safetensors")).unwrap(),
        before
    );
    loads(&out);
}

#[test]
fn a_second_run_on_the_same_output_dir_fails_at_once() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    let long = config(d.path(), &good_data(d.path()), &out, "max_steps = 1000000");
    let mut a = bin()
        .args(["--config", long.to_str().unwrap(), "--quiet"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lock = out.join(".xtf-lock");
    let t0 = Instant::now();
    while std::fs::read_to_string(&lock).unwrap_or_default().trim() != a.id().to_string() {
        assert!(t0.elapsed() < Duration::from_secs(60), "no lock");
        std::thread::sleep(Duration::from_millis(20));
    }
    let t1 = Instant::now();
    let o = run(&long, &[]);
    let waited = t1.elapsed();
    assert!(!o.status.success());
    let e = error_line(&o);
    assert!(
        e.contains(&out.display().to_string())
            && e.contains(&format!("in use by another run (pid {})", a.id())),
        "{e}"
    );
    assert!(waited < Duration::from_secs(20), "took {waited:?}");
    // A killed run's lock does not block the next run.
    a.kill().unwrap();
    a.wait().unwrap();
    let short = config(d.path(), &good_data(d.path()), &out, "max_steps = 2");
    let o = run(&short, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    loads(&out);
}

#[test]
fn resume_checks_the_settings_and_never_replaces_finished_outputs() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    let data = good_data(d.path());
    let cfg = config(
        d.path(),
        &data,
        &out,
        "max_steps = 5\nsave_steps = 3\nlr = 1e-2",
    );
    assert!(run(&cfg, &[]).status.success());
    assert!(out.join("checkpoint-3/state.json").is_file());
    let adapter = std::fs::read(out.join("adapter_model.safetensors")).unwrap();

    // A changed lr (and seed) is refused, naming both values of each.
    let changed = config(
        d.path(),
        &data,
        &out,
        "max_steps = 5\nsave_steps = 3\nlr = 2e-2\nwarmup_steps = 1",
    );
    let o = run(&changed, &["--resume"]);
    assert!(!o.status.success());
    let e = error_line(&o);
    assert!(
        e.contains("checkpoint-3: --resume: the run's settings changed")
            && e.contains("train.lr: 0.01 -> 0.02")
            && e.contains("train.warmup_steps: 0 -> 1"),
        "{e}"
    );
    // So is changed training data.
    std::fs::write(&data, "{\"prompt\": \"1+1?\", \"response\": \"3\"}\n").unwrap();
    let e = error_line(&run(&cfg, &["--resume"]));
    assert!(e.contains("data.train (tokenised)"), "{e}");
    good_data(d.path());

    // A checkpoint at or past the last step resumes nothing.
    let shorter = config(
        d.path(),
        &data,
        &out,
        "max_steps = 2\nsave_steps = 3\nlr = 1e-2",
    );
    let o = run(&shorter, &["--resume"]);
    assert!(!o.status.success());
    let e = error_line(&o);
    assert!(
        e.contains("the checkpoint is at step 3, at or past this run's last step 2"),
        "{e}"
    );
    assert_eq!(
        std::fs::read(out.join("adapter_model.safetensors")).unwrap(),
        adapter,
        "the finished run's adapter was replaced"
    );
    // The unchanged config still resumes, to the same adapter.
    let o = run(&cfg, &["--resume"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        std::fs::read(out.join("adapter_model.safetensors")).unwrap(),
        adapter
    );
}

/// A small tmpfs, unmounted on drop; `None` where mounting is not allowed.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, bytes: u64) -> Option<Self> {
        std::fs::create_dir_all(at).ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(at)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_at_the_first_checkpoint_leaves_the_old_outputs_whole() {
    let d = tempfile::tempdir().unwrap();
    let Some(fs) = Tmpfs::mount(&d.path().join("disk"), 4 << 20) else {
        eprintln!("skipping: cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN)");
        return;
    };
    let out = fs.0.join("out");
    let data = good_data(d.path());
    let first = config(d.path(), &data, &out, "max_steps = 2");
    assert!(run(&first, &[]).status.success());
    let listing = names(&out);
    let adapter = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    // Leave less room than a checkpoint needs (its trainable tensors alone
    // are the adapter's size) but enough for the small files.
    let free = fs2_free(&fs.0);
    let keep = adapter.len() as u64 / 2;
    std::fs::write(fs.0.join("filler"), vec![0u8; (free - keep) as usize]).unwrap();
    let second = config(
        d.path(),
        &data,
        &out,
        "max_steps = 4\nsave_steps = 1\nlr = 1e-3",
    );
    let o = run(&second, &[]);
    assert!(!o.status.success());
    let e = error_line(&o);
    assert!(
        e.contains(&out.join("checkpoint-1/").display().to_string())
            && e.contains("No space left on device"),
        "{e}"
    );
    assert!(!e.contains(".partial"), "names the staging directory: {e}");
    assert_eq!(e.matches("No space left on device").count(), 1, "{e}");
    assert!(!e.contains(".xtf-tmp-"), "names a temp file: {e}");
    assert_eq!(names(&out), listing, "the directory changed");
    assert_eq!(
        std::fs::read(out.join("adapter_model.safetensors")).unwrap(),
        adapter
    );
    loads(&out);
}

/// Free bytes of the file system holding `p`.
fn fs2_free(p: &Path) -> u64 {
    let o = Command::new("df")
        .args(["-B1", "--output=avail"])
        .arg(p)
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .nth(1)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn a_huge_record_is_cut_before_tokenisation_and_counted() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("train.jsonl");
    // 8 MB of response (the benchmark script runs 50 MB and reports RSS).
    let huge = "The answer is 4. ".repeat(8 << 16);
    let rows = [
        serde_json::json!({"prompt": "2+2?", "response": huge}),
        serde_json::json!({"prompt": "1+1?", "response": "2"}),
    ];
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(&data, text).unwrap();
    let cfg = config(d.path(), &data, &d.path().join("out"), "max_steps = 1");
    // max_seq_len 64: a budget of a few KiB.
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("[data]\n", "[data]\nmax_seq_len = 64\n");
    std::fs::write(&cfg, text).unwrap();
    let o = run(&cfg, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("2 examples") && e.contains("1 truncated"), "{e}");
    assert!(
        e.contains("1 records cut to their first")
            && e.contains("(only max_seq_len 64 tokens are kept)"),
        "{e}"
    );
}

#[test]
fn a_bad_gguf_with_backtraces_on_gives_one_line() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("bad.gguf");
    std::fs::write(&f, b"NOPE and some more bytes to read").unwrap();
    let cfg = config(d.path(), &good_data(d.path()), &d.path().join("out"), "");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        &tiny_model().display().to_string(),
        &f.display().to_string(),
    );
    std::fs::write(&cfg, text).unwrap();
    for bt in ["1", "full"] {
        let o = bin()
            .args(["--config", cfg.to_str().unwrap(), "--quiet"])
            .env("RUST_BACKTRACE", bt)
            .env("XTF_CACHE", d.path().join("cache"))
            .output()
            .unwrap();
        assert!(!o.status.success());
        let e = stderr(&o);
        let lines: Vec<&str> = e.lines().filter(|l| !l.contains(" INFO ")).collect();
        assert_eq!(lines.len(), 1, "RUST_BACKTRACE={bt}:\n{e}");
        assert!(
            lines[0].starts_with("error: ")
                && lines[0].contains("bad.gguf: not a GGUF file: unknown magic"),
            "{}",
            lines[0]
        );
    }
}

#[test]
fn sigterm_checkpoints_and_resume_ends_equal_to_an_uninterrupted_run() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let train = "max_steps = 300\nlr = 1e-3";
    let cfg_a = config(a.path(), &good_data(a.path()), &a.path().join("out"), train);
    let cfg_b = config(b.path(), &good_data(b.path()), &b.path().join("out"), train);
    assert!(run(&cfg_a, &[]).status.success());

    let mut child = bin()
        .args(["--config", cfg_b.to_str().unwrap(), "--quiet"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = String::new();
    let mut sent = false;
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        if !sent && line.contains("step     3/300") {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            sent = true;
        }
        err.push_str(&line);
        err.push('\n');
    }
    let status = child.wait().unwrap();
    assert!(sent, "never saw step 3:\n{err}");
    assert!(!status.success(), "a stopped run exits non-zero");
    let last = err.lines().last().unwrap();
    assert!(
        last.starts_with("error: stopped by a signal after step")
            && last.contains(&format!("xtf-train --config {} --resume", cfg_b.display())),
        "{last}"
    );
    let out = b.path().join("out");
    let ck: Vec<String> = names(&out)
        .into_iter()
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    assert_eq!(ck.len(), 1, "{:?}", names(&out));
    assert!(!out.join("adapter_model.safetensors").exists());
    let o = run(&cfg_b, &["--resume"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        std::fs::read(out.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(a.path().join("out/adapter_model.safetensors")).unwrap(),
        "the resumed run's adapter differs from the uninterrupted run's"
    );
    let losses = |p: &Path| -> Vec<String> {
        std::fs::read_to_string(p.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                format!("{} {}", v["step"], v["loss"])
            })
            .collect()
    };
    assert_eq!(losses(&out), losses(&a.path().join("out")));
}

#[test]
fn leftovers_of_killed_runs_are_removed_by_the_next_run() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    std::fs::create_dir_all(out.join(".staging-999999")).unwrap();
    std::fs::create_dir_all(out.join(".checkpoint-7.partial")).unwrap();
    std::fs::write(out.join(".xtf-tmp-abc"), b"half").unwrap();
    std::fs::create_dir_all(out.join("merged")).unwrap();
    std::fs::write(out.join("merged/.xtf-tmp-def"), b"half").unwrap();
    let cfg = config(d.path(), &good_data(d.path()), &out, "max_steps = 1");
    let o = run(&cfg, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let left: Vec<String> = names(&out)
        .into_iter()
        .chain(names(&out.join("merged")))
        .filter(|n| {
            n.starts_with(".staging") || n.starts_with(".checkpoint") || n.starts_with(".xtf-tmp")
        })
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
