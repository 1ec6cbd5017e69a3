//! Several ranks (issue 22), launched as `mpirun -np N xtf-train ...` from
//! the test, against one rank. The multi-rank tests need Open MPI's
//! `mpirun` and a test build with `--features mpi` (`.ci/run` does both);
//! without them they skip with a message. The launch guards run everywhere.

use crate::cli::tiny_run;
use crate::common::{bin, stderr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn mpirun_available() -> bool {
    if !cfg!(feature = "mpi") {
        eprintln!("skipping: the test binary was built without the `mpi` feature");
        return false;
    }
    let ok = Command::new("mpirun")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("skipping: mpirun not found (apt-get install openmpi-bin libopenmpi-dev)");
    }
    ok
}

/// `mpirun -np n xtf-train args...`, as root where needed, one thread per
/// rank (two ranks share this 2-core machine), every rank's weights
/// compared after each step.
fn mpirun(n: usize, args: &[&str]) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["--oversubscribe", "-np", &n.to_string()])
        .arg(env!("CARGO_BIN_EXE_xtf-train"))
        .args(args)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("RAYON_NUM_THREADS", "1")
        .env("XTF_CHECK_RANKS", "1");
    c
}

fn run_ranks(n: usize, cfg: &Path, extra: &[&str]) {
    let mut args = vec!["--config", cfg.to_str().unwrap(), "--quiet"];
    args.extend_from_slice(extra);
    let o = match n {
        1 => bin()
            .args(&args)
            .env("RAYON_NUM_THREADS", "1")
            .output()
            .unwrap(),
        _ => mpirun(n, &args).output().unwrap(),
    };
    assert!(o.status.success(), "{n} ranks: {}", stderr(&o));
}

/// A config over the tiny model and its data, `max_steps` steps.
fn config(dir: &Path, name: &str, train: &str, extra: &str) -> PathBuf {
    let tiny = tiny_run().join("runs/tiny");
    let text = format!(
        "[model]\npath = {:?}\n[data]\ntrain = {:?}\ntemplate = \"Question: {{prompt}}\\nAnswer: \"\n\
         max_seq_len = 128\nlimit = 64\n[train]\nseed = 5\nlr = 1e-3\n{train}\n[output]\ndir = {:?}\n{extra}",
        tiny.join("model").display().to_string(),
        tiny.join("data/train.jsonl").display().to_string(),
        dir.join(name).display().to_string()
    );
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(&p, text).unwrap();
    p
}

fn losses(out: &Path) -> Vec<f64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

fn weights(out: &Path) -> Vec<(String, Vec<f32>)> {
    let f = match out.join("adapter_model.safetensors").exists() {
        true => out.join("adapter_model.safetensors"),
        false => out.join("model.safetensors"),
    };
    let mut v: Vec<(String, Vec<f32>)> =
        candle_core::safetensors::load(&f, &candle_core::Device::Cpu)
            .unwrap()
            .into_iter()
            .map(|(k, t)| {
                let t = t.to_dtype(candle_core::DType::F32).unwrap();
                (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            })
            .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// The largest relative difference: per tensor ‖a − b‖ / ‖a‖, and per
/// step |a − b| / |a| for the losses.
fn rel(a: &[f32], b: &[f32]) -> f64 {
    let norm = |x: &[f32]| x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
    let d: Vec<f32> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    norm(&d) / norm(a).max(1e-30)
}

fn assert_close(one: &Path, many: &Path, what: &str) {
    let (la, lb) = (losses(one), losses(many));
    assert_eq!(la.len(), lb.len(), "{what}: steps");
    for (s, (a, b)) in la.iter().zip(&lb).enumerate() {
        assert!(
            (a - b).abs() <= 1e-5 * a.abs(),
            "{what}: step {} loss {a} vs {b}",
            s + 1
        );
    }
    let (wa, wb) = (weights(one), weights(many));
    assert_eq!(wa.len(), wb.len());
    for ((ka, a), (kb, b)) in wa.iter().zip(&wb) {
        assert_eq!(ka, kb);
        let r = rel(a, b);
        assert!(r <= 1e-5, "{what}: {ka} differs by {r:e} (relative)");
    }
}

fn assert_same_weights(a: &Path, b: &Path, what: &str) {
    assert!(weights(a) == weights(b), "{what}: weights differ");
}

#[test]
fn two_ranks_match_one_rank_with_the_same_global_batch() {
    if !mpirun_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    for (method, accum) in [("lora", 1), ("lora", 2), ("full", 1), ("full", 2)] {
        let train = |mbs: usize| {
            format!("method = \"{method}\"\nmax_steps = 4\ngrad_accum = {accum}\nmicro_batch_size = {mbs}")
        };
        let tag = format!("{method}-{accum}");
        let one = config(d.path(), &format!("one-{tag}"), &train(4), "");
        let two = config(d.path(), &format!("two-{tag}"), &train(2), "");
        run_ranks(1, &one, &[]);
        // XTF_CHECK_RANKS: the run fails if the ranks' weights ever differ.
        run_ranks(2, &two, &[]);
        assert_close(
            &d.path().join(format!("one-{tag}")),
            &d.path().join(format!("two-{tag}")),
            &tag,
        );
        // Rank 0 alone writes the TensorBoard log.
        let tb = d.path().join(format!("two-{tag}/tensorboard"));
        assert_eq!(
            std::fs::read_dir(&tb).unwrap().count(),
            1,
            "{}",
            tb.display()
        );
    }
}

#[test]
fn zero2_gives_the_weights_of_plain_data_parallel() {
    if !mpirun_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    for (method, ckpt) in [
        ("lora", false),
        ("full", false),
        ("lora", true),
        ("full", true),
    ] {
        let train = |zero: u8| {
            format!(
                "method = \"{method}\"\nmax_steps = 4\ngrad_accum = 1\nmicro_batch_size = 2\n\
                 zero = {zero}\ngradient_checkpointing = {ckpt}"
            )
        };
        let tag = format!("{method}-{ckpt}");
        let dp = config(d.path(), &format!("dp-{tag}"), &train(0), "");
        let z2 = config(d.path(), &format!("z2-{tag}"), &train(2), "");
        run_ranks(2, &dp, &[]);
        run_ranks(2, &z2, &[]);
        assert_same_weights(
            &d.path().join(format!("dp-{tag}")),
            &d.path().join(format!("z2-{tag}")),
            &tag,
        );
        assert_eq!(
            losses(&d.path().join(format!("dp-{tag}"))),
            losses(&d.path().join(format!("z2-{tag}")))
        );
    }
}

#[test]
fn the_scoring_pass_on_two_ranks_writes_what_one_rank_writes() {
    if !mpirun_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    for preset in ["paper", "authors"] {
        let xtf = format!("[xtf]\npreset = \"{preset}\"\nbatch_size = 5\n");
        let one = config(d.path(), &format!("s1-{preset}"), "max_steps = 1", &xtf);
        let two = config(d.path(), &format!("s2-{preset}"), "max_steps = 1", &xtf);
        run_ranks(1, &one, &["score"]);
        run_ranks(2, &two, &["score"]);
        for f in ["scores.jsonl", "xtf_summary.json"] {
            let a = std::fs::read(d.path().join(format!("s1-{preset}/{f}"))).unwrap();
            let b = std::fs::read(d.path().join(format!("s2-{preset}/{f}"))).unwrap();
            assert!(a == b, "{preset}: {f} differs between 1 and 2 ranks");
        }
    }
}

#[test]
fn a_checkpoint_resumes_on_another_number_of_ranks() {
    if !mpirun_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let train = |mbs: usize| format!("max_steps = 6\nsave_steps = 3\nmicro_batch_size = {mbs}");
    // Uninterrupted: one rank; and two ranks.
    let one = config(d.path(), "one", &train(4), "");
    let two = config(d.path(), "two", &train(2), "");
    run_ranks(1, &one, &[]);
    run_ranks(2, &two, &[]);
    for (from, to, ranks, mbs) in [("two", "two-to-one", 1, 4), ("one", "one-to-two", 2, 2)] {
        // The checkpoint of `from` alone in a fresh output dir, resumed on
        // the other number of ranks.
        let out = d.path().join(to);
        std::fs::create_dir_all(&out).unwrap();
        let ck = d.path().join(from).join("checkpoint-3");
        let dst = out.join("checkpoint-3");
        std::fs::create_dir_all(&dst).unwrap();
        for f in std::fs::read_dir(&ck).unwrap().flatten() {
            std::fs::copy(f.path(), dst.join(f.file_name())).unwrap();
        }
        let cfg = config(d.path(), to, &train(mbs), "");
        run_ranks(ranks, &cfg, &["--resume"]);
        assert_close(
            &d.path().join("one"),
            &out,
            &format!("{from} resumed on {ranks}"),
        );
    }
}

#[test]
fn one_failed_rank_ends_the_job_quickly() {
    if !mpirun_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let cfg = config(
        d.path(),
        "fail",
        "max_steps = 1000\nmicro_batch_size = 2",
        "",
    );
    let t0 = Instant::now();
    let o = mpirun(2, &["--config", cfg.to_str().unwrap(), "--quiet"])
        .env("XTF_FAIL_RANK", "1:3")
        .output()
        .unwrap();
    let took = t0.elapsed();
    assert!(!o.status.success(), "the job must fail");
    let e = stderr(&o);
    assert!(
        e.contains("error: rank 1: injected failure at step 3 (XTF_FAIL_RANK=1:3)"),
        "{e}"
    );
    assert!(took < Duration::from_secs(60), "took {took:?}");
}

#[test]
fn every_collective_on_awkward_sizes() {
    if !mpirun_available() {
        return;
    }
    for n in [2, 3] {
        let o = mpirun(n, &["dist-selftest"]).output().unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success() && out.contains(&format!("passed on each of {n} ranks")),
            "{n} ranks: {out}\n{}",
            stderr(&o)
        );
    }
}

#[test]
fn a_launcher_the_binary_cannot_join_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path(), "guard", "max_steps = 1", "");
    // Slurm asked for two tasks, but this process is one rank.
    let o = bin()
        .args(["--config", cfg.to_str().unwrap()])
        .env("SLURM_NTASKS", "2")
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("SLURM_NTASKS is 2 but MPI reports one rank"),
        "{}",
        stderr(&o)
    );
    assert!(!d.path().join("guard").exists());
    if !cfg!(feature = "mpi") {
        // Started by mpirun (as its variables say) without the feature.
        let o = bin()
            .args(["--config", cfg.to_str().unwrap()])
            .env("OMPI_COMM_WORLD_SIZE", "2")
            .output()
            .unwrap();
        assert!(!o.status.success());
        assert!(
            stderr(&o).contains("built without the `mpi` feature"),
            "{}",
            stderr(&o)
        );
    }
}

/// Issue 25 with several ranks: SIGTERM reaches every rank (as Slurm sends
/// it to every task); they agree on the step to stop at, write one
/// checkpoint, exit non-zero, and `--resume` ends where an uninterrupted run
/// ends.
#[test]
fn sigterm_stops_every_rank_at_the_same_step() {
    if !mpirun_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let train = "max_steps = 200\nmicro_batch_size = 2";
    let whole = config(d.path(), "whole", train, "");
    let cut = config(d.path(), "cut", train, "");
    run_ranks(2, &whole, &[]);
    let mut job = mpirun(2, &["--config", cut.to_str().unwrap(), "--quiet"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::BufRead;
    let mut log = String::new();
    let mut sent = false;
    for line in std::io::BufReader::new(job.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        if !sent && line.contains("step     5/200") {
            // Every rank of this job (their command lines start with the
            // binary and name its config; mpirun's does not start so).
            let ranks = format!(
                "^{} --config {}",
                env!("CARGO_BIN_EXE_xtf-train"),
                cut.display()
            );
            let _ = Command::new("pkill").args(["-TERM", "-f", &ranks]).status();
            sent = true;
        }
        log.push_str(&line);
        log.push('\n');
    }
    let status = job.wait().unwrap();
    assert!(sent, "never saw step 5:\n{log}");
    assert!(!status.success());
    let stops: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("stopped by a signal after step"))
        .collect();
    assert!(!stops.is_empty(), "{log}");
    let out = d.path().join("cut");
    let ck: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    assert_eq!(ck.len(), 1, "{ck:?}\n{log}");
    run_ranks(2, &cut, &["--resume"]);
    assert_same_weights(&d.path().join("whole"), &out, "resumed after SIGTERM");
}
