//! Answer extraction, comparison, pass@k, and the loaders on the real files.

use std::io::Write;
use std::path::{Path, PathBuf};
use xtf_train::eval::sandbox::{self, Outcome, SandboxLimits};
use xtf_train::eval::tasks::{
    extract_boxed, extract_gsm8k, extract_pubmedqa, is_correct, load_gsm8k, load_humaneval,
    load_math500, load_pubmedqa, math_equiv, mean_pass_at_k, normalize_math, normalize_number,
    pass_at_k, TaskKind,
};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// `../shared/data` next to the crate; tests that need it skip when absent.
fn data_dir() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data");
    if dir.is_dir() {
        Some(dir)
    } else {
        eprintln!("skipping: {} not found", dir.display());
        None
    }
}

fn python() -> Option<SandboxLimits> {
    let limits = SandboxLimits::default();
    if sandbox::python_available(&limits.python) {
        Some(limits)
    } else {
        eprintln!("skipping: {} does not run", limits.python.display());
        None
    }
}

fn s(x: &str) -> Option<String> {
    Some(x.to_string())
}

// ---------------------------------------------------------------- GSM8K

#[test]
fn normalize_number_canonicalises_written_numbers() {
    let cases = [
        ("1,234", s("1234")),
        ("3.0", s("3")),
        ("-0.50", s("-0.5")),
        ("$12", s("12")),
        ("\\$12", s("12")),
        ("-$5", s("-5")),
        ("12%", s("12")),
        ("18.", s("18")),
        (" 007 ", s("7")),
        (".5", s("0.5")),
        ("+7", s("7")),
        ("-0", s("0")),
        ("-0.00", s("0")),
        ("1,450,000", s("1450000")),
        (
            "123456789012345678901234567890",
            s("123456789012345678901234567890"),
        ),
        ("3/4", None),
        ("1e3", None),
        ("12 dollars", None),
        ("", None),
        ("-", None),
        (".", None),
        ("$", None),
        ("eighteen", None),
    ];
    for (input, want) in cases {
        assert_eq!(normalize_number(input), want, "normalize_number({input:?})");
    }
}

#[test]
fn extract_gsm8k_prefers_the_marker_then_the_last_number() {
    let cases = [
        ("She sells 9 eggs for $2 each.\n#### 18", s("18")),
        ("#### 1,234.00 dollars", s("1234")),
        ("So the answer is 42.", s("42")),
        ("It costs $1,200 in total.", s("1200")),
        ("The change is -3 degrees", s("-3")),
        ("10-3=7", s("7")),
        ("item-5 then 6", s("6")),
        ("values 1,2,3", s("3")),
        ("pi is about 3.14.", s("3.14")),
        ("half is .5", s("0.5")),
        // the marker wins over later numbers; the last marker wins
        ("#### 5\nCheck: 2 + 3 = 5, 7 steps", s("5")),
        ("#### 4\n#### 9", s("9")),
        // malformed: a marker without a number, or no number at all
        ("#### eighteen", None),
        ("I am not sure.", None),
        ("", None),
    ];
    for (output, want) in cases {
        assert_eq!(extract_gsm8k(output), want, "extract_gsm8k({output:?})");
    }
}

#[test]
fn gsm8k_is_correct_right_wrong_and_unanswered() {
    let k = TaskKind::Gsm8k;
    assert!(is_correct(k, "so #### 1,000", "1000"));
    assert!(is_correct(k, "The answer is $1000.00.", "1000"));
    assert!(!is_correct(k, "#### 999", "1000"));
    assert!(!is_correct(k, "no idea", "1000"));
    assert!(!is_correct(k, "#### 1000", "not a number"));
}

// ----------------------------------------------------------------- MATH

#[test]
fn extract_boxed_takes_the_last_balanced_box() {
    let cases = [
        ("so \\boxed{5}.", s("5")),
        ("\\boxed{\\frac{1}{\\sqrt{2}}}", s("\\frac{1}{\\sqrt{2}}")),
        ("first \\boxed{1} then \\boxed{\\{1, 2\\}}", s("\\{1, 2\\}")),
        ("\\fbox{7}", s("7")),
        ("\\fbox{7} and \\boxed{8}", s("8")),
        ("$\\boxed 12$ done", s("12")),
        ("\\boxed{}", s("")),
        ("\\boxed{\\frac{1}{2}", None), // never closes
        ("\\boxed5", None),
        ("the answer is 5", None),
    ];
    for (output, want) in cases {
        assert_eq!(extract_boxed(output), want, "extract_boxed({output:?})");
    }
}

/// Golden outputs of hendrycks/math `modeling/math_equivalence.py`:
/// `print(_strip_string(s))` for each input (the input itself where it raises).
#[test]
fn normalize_math_matches_hendrycks_strip_string() {
    let golden = [
        ("\\frac12", "\\frac{1}{2}"),
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("0.5", "\\frac{1}{2}"),
        (".5", "\\frac{1}{2}"),
        (" .5", "\\frac{1}{2}"),
        ("1/2", "\\frac{1}{2}"),
        ("-1/2", "\\frac{-1}{2}"),
        ("01/2", "01/2"),
        ("+1/2", "+1/2"),
        ("x = 5", "5"),
        ("abc=4", "abc=4"),
        ("a=b=c", "a=b=c"),
        ("y=", ""),
        ("10\\%", "10"),
        ("10%", "10"),
        ("90^\\circ", "90"),
        ("90^{\\circ}", "90"),
        ("\\left( 1, 2 \\right)", "(1,2)"),
        ("5 \\text{ cm}", "5"),
        ("5 \\text{ cm} \\text{ m}", "5 \\text{ cm} \\text{ m}"), // raises
        ("\\sqrt3", "\\sqrt{3}"),
        ("\\sqrt", "\\sqrt"), // raises
        ("\\frac1", "\\frac1"),
        ("\\frac1{72}", "\\frac{1}{72}"),
        ("\\frac{72}1", "\\frac{72}1"),
        ("\\frac a b", "\\frac{a}{b}"),
        ("\\$5", "5"),
        ("3 .5", "30.5"),
        ("{.5}", "{0.5}"),
        ("\\!1\\!0", "10"),
        ("a\\\\b", "a\\b"),
        ("\\tfrac34", "\\frac{3}{4}"),
        ("2\\sqrt2/3", "2\\sqrt{2}/3"),
        ("\\sqrt{\\frac12}", "\\sqrt{\\frac{1}{2}}"),
        ("\\frac1\\sqrt2", "\\frac{1}{\\}sqrt{2}"),
        ("0.50", "0.50"),
        ("\n5\n", "5"),
    ];
    for (input, want) in golden {
        assert_eq!(normalize_math(input), want, "normalize_math({input:?})");
    }
}

#[test]
fn math_equiv_and_is_correct() {
    assert!(math_equiv("\\dfrac{1}{2}", "0.5"));
    assert!(math_equiv("1/2", "\\frac12"));
    assert!(math_equiv("x = 10\\%", "10"));
    assert!(!math_equiv("\\frac{1}{3}", "\\frac{1}{2}"));
    // where normalisation raises, raw equality decides
    assert!(math_equiv("\\sqrt", "\\sqrt"));
    assert!(!math_equiv("\\sqrt", "\\sqrt{}"));
    let k = TaskKind::Math500;
    assert!(is_correct(
        k,
        "Thus $\\boxed{\\dfrac{\\pi}{2}}$.",
        "\\frac{\\pi}{2}"
    ));
    assert!(is_correct(k, "\\boxed{(1, 2)}", "(1,2)"));
    assert!(!is_correct(k, "\\boxed{3}", "4"));
    assert!(!is_correct(k, "The answer is 4.", "4")); // no box, no answer
    assert!(!is_correct(k, "\\boxed{4", "4"));
}

// ------------------------------------------------------------- PubMedQA

#[test]
fn extract_pubmedqa_reads_the_label_after_the_marker() {
    let cases = [
        ("Yes", s("yes")),
        ("ANSWER: No.", s("no")),
        ("answer: **Maybe**", s("maybe")),
        ("There is no clear evidence.\nFinal answer: yes", s("yes")),
        ("The data say yes, not no.", s("yes")),
        ("Answer: unclear, but no", s("no")),
        ("Answer: unclear", None),
        ("Nope, yesterday maybelline", None),
        ("", None),
    ];
    for (output, want) in cases {
        assert_eq!(
            extract_pubmedqa(output),
            want,
            "extract_pubmedqa({output:?})"
        );
    }
    assert!(is_correct(TaskKind::PubMedQa, "Answer: YES", "yes"));
    assert!(!is_correct(TaskKind::PubMedQa, "Answer: no", "yes"));
    assert!(!is_correct(TaskKind::HumanEval, "anything", "anything"));
}

// ---------------------------------------------------------------- pass@k

fn binomial(n: usize, k: usize) -> f64 {
    (0..k).fold(1.0, |acc, i| acc * (n - i) as f64 / (i + 1) as f64)
}

#[test]
fn pass_at_k_known_values() {
    let close = |a: Option<f64>, b: f64| a.is_some_and(|a| (a - b).abs() < 1e-12);
    assert!(close(pass_at_k(10, 3, 1), 0.3));
    assert!(close(pass_at_k(10, 0, 1), 0.0));
    assert!(close(pass_at_k(10, 0, 5), 0.0));
    assert!(close(pass_at_k(5, 5, 1), 1.0));
    assert!(close(pass_at_k(5, 5, 5), 1.0));
    // 1 - C(7,2)/C(10,2) = 1 - 21/45
    assert!(close(pass_at_k(10, 3, 2), 1.0 - 21.0 / 45.0));
    // n - c < k: every draw of k contains a correct sample
    assert!(close(pass_at_k(10, 8, 3), 1.0));
    assert_eq!(pass_at_k(3, 1, 5), None);
    assert_eq!(pass_at_k(3, 1, 0), None);
    assert_eq!(pass_at_k(3, 4, 1), None);
}

#[test]
fn pass_at_k_product_form_equals_exact_binomials() {
    for n in 1..=30 {
        for c in 0..=n {
            for k in 1..=n {
                let exact = 1.0 - binomial(n - c, k) / binomial(n, k);
                let got = pass_at_k(n, c, k).expect("n >= k");
                assert!(
                    (got - exact).abs() < 1e-9,
                    "n={n} c={c} k={k}: {got} <> {exact}"
                );
            }
        }
    }
}

#[test]
fn mean_pass_at_k_requires_every_problem_to_have_k_samples() {
    let m = mean_pass_at_k(&[(10, 3), (10, 0), (5, 5)], 1).expect("all n >= 1");
    assert!((m - (0.3 + 0.0 + 1.0) / 3.0).abs() < 1e-12);
    assert_eq!(mean_pass_at_k(&[(10, 3), (4, 1)], 5), None);
    assert_eq!(mean_pass_at_k(&[], 1), None);
}

// --------------------------------------------------------------- loaders

fn write_temp(name: &str, text: &str) -> Result<(tempfile::TempDir, PathBuf), std::io::Error> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join(name);
    std::fs::File::create(&path)?.write_all(text.as_bytes())?;
    Ok((dir, path))
}

#[test]
fn load_math500_reads_problem_and_answer() -> TestResult {
    let text = concat!(
        r#"{"problem": "What is $1+1$?", "solution": "...", "answer": "2", "subject": "Algebra", "level": 1, "unique_id": "test/algebra/1.json"}"#,
        "\n\n",
        r#"{"problem": "Half?", "answer": "\\frac{1}{2}"}"#,
        "\n"
    );
    let (_dir, path) = write_temp("math500.jsonl", text)?;
    let items = load_math500(&path)?;
    assert_eq!(items.len(), 2);
    assert_eq!(items[0].id, "test/algebra/1.json");
    assert_eq!(items[1].id, "math500-1");
    assert_eq!(items[1].reference, "\\frac{1}{2}");
    assert!(is_correct(
        TaskKind::Math500,
        "\\boxed{0.5}",
        &items[1].reference
    ));
    Ok(())
}

#[test]
fn loader_errors_name_the_file_and_line() -> TestResult {
    let (_dir, path) = write_temp(
        "bad.jsonl",
        "{\"problem\": \"p\", \"answer\": \"1\"}\n{oops\n",
    )?;
    let msg = load_math500(&path)
        .expect_err("line 2 is not JSON")
        .to_string();
    assert!(msg.contains("bad.jsonl:2:"), "{msg}");

    let (_dir, path) = write_temp("g.jsonl", "{\"question\": \"q\", \"answer\": \"so 5\"}\n")?;
    let msg = load_gsm8k(&path).expect_err("no ####").to_string();
    assert!(msg.contains("g.jsonl:1:") && msg.contains("####"), "{msg}");

    let msg = load_humaneval(Path::new("/nonexistent/HumanEval.jsonl.gz"))
        .expect_err("missing file")
        .to_string();
    assert!(msg.contains("/nonexistent/HumanEval.jsonl.gz"), "{msg}");
    Ok(())
}

#[test]
fn gsm8k_gold_solutions_score_correct_on_every_test_item() -> TestResult {
    let Some(data) = data_dir() else {
        return Ok(());
    };
    let path = data.join("gsm8k/test.jsonl");
    let items = load_gsm8k(&path)?;
    assert_eq!(items.len(), 1319);
    let raw = std::fs::read_to_string(&path)?;
    for (item, line) in items.iter().zip(raw.lines()) {
        let row: serde_json::Value = serde_json::from_str(line)?;
        let gold = row["answer"].as_str().ok_or("answer is a string")?;
        assert!(
            is_correct(TaskKind::Gsm8k, gold, &item.reference),
            "{}: {gold:?}",
            item.id
        );
        assert!(
            !is_correct(TaskKind::Gsm8k, "#### 0.123", &item.reference),
            "{}",
            item.id
        );
    }
    assert_eq!(load_gsm8k(&data.join("gsm8k/train.jsonl"))?.len(), 7473);
    Ok(())
}

#[test]
fn pubmedqa_loads_the_500_test_items() -> TestResult {
    let Some(data) = data_dir() else {
        return Ok(());
    };
    let dir = data.join("pubmedqa");
    let items = load_pubmedqa(
        &dir.join("ori_pqal.json"),
        &dir.join("test_ground_truth.json"),
    )?;
    assert_eq!(items.len(), 500);
    let count = |l: &str| items.iter().filter(|i| i.reference == l).count();
    assert_eq!((count("yes"), count("no"), count("maybe")), (276, 169, 55));
    for item in &items {
        assert!(item.prompt.starts_with("Abstract: "), "{}", item.id);
        assert!(item.prompt.contains("\nQuestion: ") && item.prompt.ends_with("\nAnswer:"));
        assert!(is_correct(
            TaskKind::PubMedQa,
            &format!("Answer: {}", item.reference),
            &item.reference
        ));
    }
    Ok(())
}

#[test]
fn humaneval_canonical_solutions_pass_and_empty_bodies_fail() -> TestResult {
    let Some(data) = data_dir() else {
        return Ok(());
    };
    let path = data.join("humaneval/HumanEval.jsonl.gz");
    let items = load_humaneval(&path)?;
    assert_eq!(items.len(), 164);
    assert_eq!(items[0].id, "HumanEval/0");
    assert_eq!(items[0].entry_point.as_deref(), Some("has_close_elements"));

    // The same file uncompressed loads to the same items.
    let mut plain = String::new();
    std::io::Read::read_to_string(
        &mut flate2::read::GzDecoder::new(std::fs::File::open(&path)?),
        &mut plain,
    )?;
    let (_dir, plain_path) = write_temp("HumanEval.jsonl", &plain)?;
    assert_eq!(load_humaneval(&plain_path)?, items);

    let Some(limits) = python() else {
        return Ok(());
    };
    for item in &items[..10] {
        let good = sandbox::humaneval_program(item, &item.reference).ok_or("has a test")?;
        assert_eq!(
            sandbox::run_program(&good, &limits),
            Outcome::Passed,
            "{}",
            item.id
        );
        let empty = sandbox::humaneval_program(item, "    pass\n").ok_or("has a test")?;
        assert!(
            !sandbox::run_program(&empty, &limits).is_passed(),
            "{}",
            item.id
        );
    }
    Ok(())
}
