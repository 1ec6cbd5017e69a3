//! The synthetic data and tokenizer behind `init-tiny`: determinism, exact
//! arithmetic, the noise-span invariant and a lossless, stable tokenizer.

use std::collections::BTreeSet;
use xtf_train::assets::synth::*;

type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Evaluate every `<<a op b=c>>` in `text`; returns the results in order.
fn check_annotations(text: &str) -> Result<Vec<i64>> {
    let mut results = Vec::new();
    let mut rest = text;
    while let Some(open) = rest.find("<<") {
        let close = rest[open..].find(">>").ok_or("unclosed annotation")? + open;
        let inner = &rest[open + 2..close];
        let (expr, c) = inner
            .split_once('=')
            .ok_or(format!("no '=' in {inner:?}"))?;
        let c: i64 = c.parse()?;
        let at = expr
            .find(['+', '-', '*', '/'])
            .ok_or(format!("no operator in {inner:?}"))?;
        let (a, b): (i64, i64) = (expr[..at].parse()?, expr[at + 1..].parse()?);
        let value = match &expr[at..at + 1] {
            "+" => a + b,
            "-" => a - b,
            "*" => a * b,
            _ => {
                assert_eq!(a % b, 0, "inexact division in {inner:?}");
                a / b
            }
        };
        assert_eq!(value, c, "wrong annotation {inner:?}");
        assert!(c >= 0, "negative intermediate in {inner:?}");
        // The visible copy after `>>` repeats the result.
        let after = &rest[close + 2..];
        let shown: String = after.chars().take_while(char::is_ascii_digit).collect();
        assert_eq!(shown, c.to_string(), "visible result differs in {text:?}");
        results.push(c);
        rest = after;
    }
    Ok(results)
}

fn corpus(problems: &[Problem]) -> Vec<String> {
    problems
        .iter()
        .map(|p| format!("{}\n{}", p.prompt, p.response))
        .collect()
}

#[test]
fn same_seed_gives_identical_problems() {
    assert_eq!(generate_problems(200, 42), generate_problems(200, 42));
}

#[test]
fn different_seeds_give_different_problems() {
    let (a, b) = (generate_problems(50, 1), generate_problems(50, 2));
    let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
    assert!(same < 5, "{same} of 50 problems coincide across seeds");
}

#[test]
fn shorter_run_is_a_prefix_of_longer_run() {
    let long = generate_problems(300, 9);
    assert_eq!(generate_problems(120, 9), long[..120]);
}

#[test]
fn every_annotation_and_final_answer_is_correct() -> Result {
    for p in generate_problems(500, 3) {
        let results = check_annotations(&p.response)?;
        assert!(results.len() >= 2, "fewer than two steps: {:?}", p.response);
        assert_eq!(
            results.last(),
            Some(&p.answer),
            "answer is not the last result: {:?}",
            p.response
        );
    }
    Ok(())
}

#[test]
fn response_ends_with_a_single_hash_line() {
    for p in generate_problems(500, 4) {
        let last = p.response.lines().last().unwrap_or_default();
        assert_eq!(last, format!("#### {}", p.answer));
        assert_eq!(p.response.matches("####").count(), 1);
        assert!(!p.prompt.contains("####") && !p.prompt.contains("<<"));
        assert!(p.response.is_ascii() && p.prompt.is_ascii());
    }
}

#[test]
fn problems_are_varied_but_regular() {
    let ps = generate_problems(300, 5);
    let prompts: BTreeSet<&str> = ps.iter().map(|p| p.prompt.as_str()).collect();
    assert!(
        prompts.len() >= 295,
        "only {} distinct prompts in 300",
        prompts.len()
    );
    // Distinct shapes: the prompt with its numbers blanked out and names kept.
    let shapes: BTreeSet<String> = ps
        .iter()
        .map(|p| p.prompt.replace(|c: char| c.is_ascii_digit(), ""))
        .collect();
    assert!(shapes.len() >= 50, "only {} prompt shapes", shapes.len());
    // Scaffolding repeats, which is what a tiny model can learn confidently.
    let openers = ps
        .iter()
        .filter(|p| p.response.starts_with("First, let's figure out"))
        .count();
    assert!(
        (60..=180).contains(&openers),
        "{openers} responses open with the figure-out line"
    );
    let ops: BTreeSet<char> = ps
        .iter()
        .flat_map(|p| {
            p.response
                .split("<<")
                .skip(1)
                .filter_map(|s| s.chars().find(|c| "+-*/".contains(*c)))
        })
        .collect();
    assert_eq!(ops.len(), 4, "operators used: {ops:?}");
}

#[test]
fn noise_spans_cut_out_give_back_the_clean_response() {
    for (i, p) in generate_problems(300, 6).iter().enumerate() {
        let n = inject_noise(p, 0.2, i as u64);
        // Sorted, disjoint, in bounds; `is_noise` is true on spans, false between.
        let mut prev_end = 0;
        for &(s, e) in &n.noise_spans {
            assert!(
                prev_end <= s && s < e && e <= n.response.len(),
                "bad span ({s},{e})"
            );
            assert!(n.is_noise(s, e) && n.is_noise(e - 1, e + 5));
            assert!(s == prev_end || !n.is_noise(prev_end, s));
            prev_end = e;
        }
        assert_eq!(n.without_noise(), p.response);
        // The answer line and the calculator annotations are never noised.
        assert!(n.response.ends_with(&format!("\n#### {}", p.answer)));
        check_annotation_text_unchanged(&p.response, &n.response);
    }
}

fn check_annotation_text_unchanged(clean: &str, noisy: &str) {
    let inner = |t: &str| -> Vec<String> {
        t.split("<<")
            .skip(1)
            .filter_map(|s| s.split(">>").next())
            .map(String::from)
            .collect()
    };
    assert_eq!(inner(clean), inner(noisy));
}

#[test]
fn noise_rate_is_met_on_average() {
    let ps = generate_problems(400, 7);
    for rate in [0.05, 0.1, 0.2, 0.3] {
        let (mut noise, mut total) = (0usize, 0usize);
        for (i, p) in ps.iter().enumerate() {
            let n = inject_noise(p, rate, 1000 + i as u64);
            noise += n.noise_len();
            total += n.response.len();
        }
        let got = noise as f64 / total as f64;
        eprintln!("asked {rate}, got {got:.4}");
        assert!((got - rate).abs() < 0.02, "asked {rate}, got {got:.4}");
    }
}

#[test]
fn zero_rate_adds_nothing_and_noise_is_deterministic() {
    let ps = generate_problems(20, 8);
    for (i, p) in ps.iter().enumerate() {
        let n = inject_noise(p, 0.0, i as u64);
        assert_eq!(n.response, p.response);
        assert!(n.noise_spans.is_empty());
        assert_eq!(
            inject_noise(p, 0.3, i as u64),
            inject_noise(p, 0.3, i as u64)
        );
    }
}

#[test]
fn all_three_noise_kinds_occur() {
    let (mut digits, mut filler, mut off_task) = (0, 0, 0);
    for (i, p) in generate_problems(200, 10).iter().enumerate() {
        let n = inject_noise(p, 0.2, i as u64);
        for &(s, e) in &n.noise_spans {
            let piece = &n.response[s..e];
            if e - s == 1 {
                // The extra digit sits inside (or at an edge of) a number.
                let b = n.response.as_bytes();
                assert!(piece.as_bytes()[0].is_ascii_digit());
                assert!(b[s - 1].is_ascii_digit() || b[e].is_ascii_digit());
                digits += 1;
            } else if piece
                .trim_end_matches('.')
                .split(", ")
                .all(|part| part.split_whitespace().count() <= 2)
            {
                filler += 1;
            } else {
                assert!(piece.starts_with(' ') && piece.ends_with('.'), "{piece:?}");
                off_task += 1;
            }
        }
    }
    assert!(
        digits > 20 && filler > 20 && off_task > 20,
        "digits {digits}, filler {filler}, off-task {off_task}"
    );
}

#[test]
fn tokenizer_has_special_ids_and_requested_size() -> Result {
    let tok = train_tokenizer(&corpus(&generate_problems(300, 11)), DEFAULT_VOCAB_SIZE)?;
    assert_eq!(tok.token_to_id("<pad>"), Some(0));
    assert_eq!(tok.token_to_id("<s>"), Some(1));
    assert_eq!(tok.token_to_id("</s>"), Some(2));
    assert_eq!(tok.get_vocab_size(true), DEFAULT_VOCAB_SIZE);
    // No template: asking for special tokens adds none (the trainer adds BOS/EOS).
    let plain = tok.encode("Tom has 3 apples.", false)?;
    let with = tok.encode("Tom has 3 apples.", true)?;
    assert_eq!(plain.get_ids(), with.get_ids());
    assert!(!with.get_ids().iter().any(|&id| id <= 2));
    Ok(())
}

#[test]
fn tokenizer_round_trips_text_exactly() -> Result {
    let ps = generate_problems(400, 12);
    let tok = train_tokenizer(&corpus(&ps[..300]), DEFAULT_VOCAB_SIZE)?;
    let path = std::env::temp_dir().join(format!("xtf-synth-tok-{}.json", std::process::id()));
    tok.save(&path, false)?;
    let loaded = tokenizers::Tokenizer::from_file(&path)?;
    std::fs::remove_file(&path)?;
    let mut texts: Vec<String> = ps[300..]
        .iter()
        .flat_map(|p| [p.prompt.clone(), p.response.clone()])
        .collect();
    texts.push(inject_noise(&ps[0], 0.3, 0).response);
    texts.push("Question: caf\u{e9} \u{1F600}\n\n  tabs\tand  spaces \n#### 42\n".to_string());
    for t in &texts {
        for tk in [&tok, &loaded] {
            let ids = tk.encode(t.as_str(), false)?.get_ids().to_vec();
            assert_eq!(&tk.decode(&ids, false)?, t);
        }
    }
    // A corpus-like text compresses well: the merges learned real words.
    let ids = tok.encode(ps[300].response.as_str(), false)?;
    assert!(
        ids.len() * 2 < ps[300].response.len(),
        "{} tokens for {} bytes",
        ids.len(),
        ps[300].response.len()
    );
    Ok(())
}

#[test]
fn tokenizer_training_is_deterministic() -> Result {
    let texts = corpus(&generate_problems(300, 13));
    let a = train_tokenizer(&texts, DEFAULT_VOCAB_SIZE)?.to_string(false)?;
    let b = train_tokenizer(&texts, DEFAULT_VOCAB_SIZE)?.to_string(false)?;
    assert_eq!(a, b);
    Ok(())
}

#[test]
fn tokenizer_rejects_too_small_vocab_and_empty_corpus() {
    let texts = corpus(&generate_problems(5, 14));
    assert!(matches!(
        train_tokenizer(&texts, 100),
        Err(SynthError::VocabTooSmall { vocab_size: 100 })
    ));
    assert!(matches!(
        train_tokenizer(&[], 512),
        Err(SynthError::EmptyCorpus)
    ));
}

/// The cost `init-tiny` pays before pre-training; printed for the log.
#[test]
fn generating_and_training_1000_is_fast() -> Result {
    let t0 = std::time::Instant::now();
    let ps = generate_problems(1000, 15);
    let t1 = t0.elapsed();
    let tok = train_tokenizer(&corpus(&ps), DEFAULT_VOCAB_SIZE)?;
    let t2 = t0.elapsed();
    eprintln!(
        "generate(1000) {:.1} ms | train_tokenizer {:.1} ms",
        t1.as_secs_f64() * 1e3,
        (t2 - t1).as_secs_f64() * 1e3
    );
    assert_eq!(tok.get_vocab_size(true), DEFAULT_VOCAB_SIZE);
    assert!(t2.as_secs_f64() < 10.0, "took {t2:?}");
    Ok(())
}
