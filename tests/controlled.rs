//! The controlled noise experiment's generator (`init-controlled`): noise
//! flags aligned with the trainer's label tokens, the clean/noisy invariant,
//! determinism, and a clean held-out set disjoint from training. Fast: a
//! small tokenizer is trained here instead of the tiny model's pre-training.
//! Nothing about the experiment's outcome is asserted.

use std::collections::BTreeSet;
use std::path::Path;
use xtf_train::assets::controlled::{self, ControlledSpec, TEMPLATE};
use xtf_train::assets::synth::{self, NoisyResponse};
use xtf_train::data::tokenizer::Tok;
use xtf_train::data::{self, Record};

type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// A byte-level BPE tokenizer trained on the task's own text (clean and
/// noisy), wrapped with the tiny model's BOS/EOS rules.
fn tokenizer() -> Result<Tok> {
    let texts: Vec<String> = controlled::generate(300, 99)
        .iter()
        .enumerate()
        .flat_map(|(i, p)| {
            let noisy = synth::inject_noise(p, 0.4, i as u64).response;
            [format!("{}\n{}", p.prompt, p.response), noisy]
        })
        .collect();
    let inner = synth::train_tokenizer(&texts, 400)?;
    let tcfg = serde_json::json!({
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
        "add_bos_token": true, "add_eos_token": false,
    });
    Ok(Tok::from_parts(
        inner,
        Some(&tcfg),
        None,
        Path::new("test-tokenizer.json"),
    )?)
}

fn small_spec() -> ControlledSpec {
    ControlledSpec {
        seed: 11,
        n_train: 60,
        n_test: 30,
        noise_rate: 0.4,
    }
}

fn read_jsonl(path: &Path) -> Result<Vec<serde_json::Value>> {
    Ok(std::fs::read_to_string(path)?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect::<std::result::Result<_, _>>()?)
}

/// Byte range of each token, from single-token decodes (independent of
/// `controlled::token_spans`, which decodes prefixes). ASCII text only.
fn spans_by_single_decode(tok: &Tok, ids: &[u32]) -> Result<Vec<(usize, usize)>> {
    let mut at = 0;
    let mut out = Vec::new();
    for &id in ids {
        let n = tok.decode(&[id])?.len();
        out.push((at, at + n));
        at += n;
    }
    Ok(out)
}

#[test]
fn hand_built_example_flags_exactly_the_overlapping_tokens() -> Result {
    let tok = tokenizer()?;
    // Clean: "Liam has 2 * 6 = <<2*6=12>>12 socks.\nTherefore, Liam has one bag of socks, which is 6 socks.\n#### 6"
    // Noise: an extra digit inside the visible "12" and a filler sentence after "socks.".
    let a = "Liam has 2 * 6 = <<2*6=12>>1";
    let b = "2 socks.";
    let c = "\nTherefore, Liam has one bag of socks, which is 6 socks.\n#### 6";
    let (digit, filler) = ("7", " Um, basically, okay.");
    let response = format!("{a}{digit}{b}{filler}{c}");
    let s1 = a.len();
    let s2 = a.len() + 1 + b.len();
    let noisy = NoisyResponse {
        noise_spans: vec![(s1, s1 + 1), (s2, s2 + filler.len())],
        response,
    };
    assert_eq!(
        noisy.without_noise(),
        format!("{a}{b}{c}"),
        "hand-built spans are wrong"
    );
    let flags = controlled::noise_flags(&tok, &noisy)?;
    let ids = tok.encode(&noisy.response)?;
    assert_eq!(flags.len(), ids.len() + 1, "one flag per token plus EOS");
    assert_eq!(*flags.last().unwrap(), 0, "EOS is never noise");
    let spans = spans_by_single_decode(&tok, &ids)?;
    let mut flagged_text = String::new();
    for (k, &(s, e)) in spans.iter().enumerate() {
        let overlaps = noisy.noise_spans.iter().any(|&(a, b)| s < b && a < e);
        let piece = &noisy.response[s..e];
        assert_eq!(
            flags[k] == 1,
            overlaps,
            "token {k} {piece:?} flagged wrongly"
        );
        if flags[k] == 1 {
            flagged_text.push_str(piece);
        }
    }
    // The filler sentence is exactly whole tokens; the digit sits inside the
    // number's token(s), which are flagged whole.
    assert!(flagged_text.contains(filler), "{flagged_text:?}");
    assert!(flagged_text.contains('7'), "{flagged_text:?}");
    assert!(!flagged_text.contains("Therefore"), "{flagged_text:?}");
    Ok(())
}

#[test]
fn noise_kinds() {
    assert_eq!(controlled::noise_kind(" Um, basically, okay."), 0);
    assert_eq!(controlled::noise_kind(" You know, so yeah."), 0);
    assert_eq!(controlled::noise_kind("7"), 1);
    assert_eq!(
        controlled::noise_kind(" Cats usually sleep for most of the day."),
        2
    );
}

#[test]
fn flags_align_with_the_trainers_label_tokens() -> Result {
    let tok = tokenizer()?;
    let spec = small_spec();
    let (train, _) = controlled::split(&spec);
    let mut digit_records = 0;
    for (i, p) in train.iter().enumerate() {
        let noisy = synth::inject_noise(p, spec.noise_rate, controlled::noise_seed(spec.seed, i));
        let flags = controlled::noise_flags(&tok, &noisy)?;
        let rec = Record::pair(p.prompt.clone(), noisy.response.clone());
        let (ex, _) = data::tokenize_one(&rec, &tok, TEMPLATE, 4096)?;
        let ex = ex.ok_or("example dropped")?;
        assert_eq!(flags.len(), ex.n_labels(), "record {i}");
        assert_eq!(ex.ids.last(), Some(&tok.eos), "last label is EOS");
        assert_eq!(flags.last(), Some(&0), "EOS flag is 0");
        // Flags are 1 exactly on tokens that overlap a span.
        let label_ids = &ex.ids[ex.label_start..ex.ids.len() - 1];
        let spans = spans_by_single_decode(&tok, label_ids)?;
        let mut kept = String::new();
        for (k, &(s, e)) in spans.iter().enumerate() {
            assert_eq!(flags[k] == 1, noisy.is_noise(s, e), "record {i} token {k}");
            if flags[k] == 0 {
                kept.push_str(&noisy.response[s..e]);
            }
        }
        // Removing the flagged tokens' text recovers the clean response
        // whenever the noise is whole sentences (their tokens never straddle
        // a span edge); an inserted digit may share a token with clean digits.
        assert_eq!(noisy.without_noise(), p.response, "record {i}");
        if noisy.noise_spans.iter().all(|&(s, e)| e - s > 1) {
            assert_eq!(kept, p.response, "record {i}");
        } else {
            digit_records += 1;
        }
    }
    assert!(
        digit_records < train.len(),
        "every record has a wrong digit: the sentence case is never checked"
    );
    Ok(())
}

#[test]
fn generated_files_are_deterministic_and_consistent() -> Result {
    let tok = tokenizer()?;
    let spec = small_spec();
    let (d1, d2) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let stats = controlled::write_data(d1.path(), &spec, &tok)?;
    controlled::write_data(d2.path(), &spec, &tok)?;
    for f in [
        "train.jsonl",
        "train_clean.jsonl",
        "noise.jsonl",
        "oracle_mask.jsonl",
        "test.jsonl",
        "manifest.json",
    ] {
        let (a, b) = (
            std::fs::read(d1.path().join(f))?,
            std::fs::read(d2.path().join(f))?,
        );
        assert!(!a.is_empty(), "{f} is empty");
        assert_eq!(a, b, "{f} differs between two runs with the same seed");
    }
    let other = tempfile::tempdir()?;
    let spec2 = ControlledSpec {
        seed: 12,
        ..small_spec()
    };
    controlled::write_data(other.path(), &spec2, &tok)?;
    assert_ne!(
        std::fs::read(d1.path().join("train.jsonl"))?,
        std::fs::read(other.path().join("train.jsonl"))?,
        "another seed gives the same data"
    );

    let train = read_jsonl(&d1.path().join("train.jsonl"))?;
    let noise = read_jsonl(&d1.path().join("noise.jsonl"))?;
    let oracle = read_jsonl(&d1.path().join("oracle_mask.jsonl"))?;
    assert_eq!((train.len(), noise.len()), (spec.n_train, spec.n_train));
    assert_eq!(oracle.len(), spec.n_train);
    let mut noisy_tokens = 0;
    for (i, ((t, n), o)) in train.iter().zip(&noise).zip(&oracle).enumerate() {
        assert_eq!(n["index"], i);
        let flags: Vec<u64> = serde_json::from_value(n["noise"].clone())?;
        let mask: Vec<u64> = serde_json::from_value(o["mask"].clone())?;
        let rec = Record::pair(
            t["prompt"].as_str().unwrap(),
            t["response"].as_str().unwrap(),
        );
        let (ex, _) = data::tokenize_one(&rec, &tok, TEMPLATE, 4096)?;
        assert_eq!(flags.len(), ex.unwrap().n_labels(), "record {i}");
        assert!(flags.iter().zip(&mask).all(|(f, m)| f + m == 1));
        let kinds: Vec<u64> = serde_json::from_value(n["token_kinds"].clone())?;
        assert_eq!(kinds.len(), flags.len());
        assert!(kinds.iter().zip(&flags).all(|(k, f)| (*k > 0) == (*f == 1)));
        noisy_tokens += flags.iter().sum::<u64>() as usize;
    }
    assert_eq!(noisy_tokens, stats.noise_label_tokens);
    assert!(noisy_tokens > 0, "no noise injected at rate 0.4");
    Ok(())
}

#[test]
fn test_set_is_clean_and_disjoint_from_training() -> Result {
    let tok = tokenizer()?;
    let spec = small_spec();
    let dir = tempfile::tempdir()?;
    controlled::write_data(dir.path(), &spec, &tok)?;
    let train = read_jsonl(&dir.path().join("train.jsonl"))?;
    let test = read_jsonl(&dir.path().join("test.jsonl"))?;
    assert_eq!(test.len(), spec.n_test);
    let seen: BTreeSet<&str> = train
        .iter()
        .map(|r| r["prompt"].as_str().unwrap())
        .collect();
    let mut prompts = BTreeSet::new();
    let fillers = [
        "Um",
        "Like",
        "Basically",
        "Actually",
        "You know",
        "Hmm",
        "Okay",
    ];
    for r in &test {
        let q = r["question"].as_str().unwrap();
        let answer = r["answer"].as_str().unwrap();
        assert!(!seen.contains(q), "held-out prompt also in training: {q}");
        assert!(prompts.insert(q), "duplicate held-out prompt: {q}");
        assert_eq!(r["prompt"].as_str(), Some(q));
        assert_eq!(r["response"].as_str(), Some(answer));
        // Clean: no filler or off-task sentence, and every visible result
        // equals its annotation (no injected digit).
        for f in fillers {
            assert!(!answer.contains(&format!(" {f}")), "noise in {answer:?}");
        }
        assert!(!answer.contains("weather") && !answer.contains("Pizza"));
        for piece in answer.split("<<").skip(1) {
            let (inner, after) = piece.split_once(">>").ok_or("unclosed annotation")?;
            let result = inner.rsplit_once('=').ok_or("no =")?.1;
            let shown: String = after.chars().take_while(char::is_ascii_digit).collect();
            assert_eq!(shown, result, "wrong visible result in {answer:?}");
        }
        // GSM8K format: the reference follows `####` and is the package size.
        let reference: i64 = answer.rsplit_once("#### ").ok_or("no ####")?.1.parse()?;
        assert!(
            controlled::PACKAGES.iter().any(|&(_, _, n)| n == reference),
            "{reference} is not a package size"
        );
    }
    // The training responses are noisy, and their clean versions match.
    for r in &train {
        let clean = r["clean_response"].as_str().unwrap();
        assert_ne!(
            r["response"].as_str(),
            Some(clean),
            "a training response has no noise"
        );
    }
    Ok(())
}
