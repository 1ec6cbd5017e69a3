//! The tokenisation contract on a word-level tokenizer whose ids we know by hand.

use candle_core::Device;
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;
use xtf_train::data::{make_batch, read_jsonl, tokenize_one, Example, Record};
use xtf_train::tokenizer::Tok;

/// ids: <pad>=0 <s>=1 </s>=2 <unk>=3 Q:=4 a=5 b=6 c=7 ANS=8
fn word_tokenizer() -> tokenizers::Tokenizer {
    let vocab: HashMap<String, u32> = ["<pad>", "<s>", "</s>", "<unk>", "Q:", "a", "b", "c", "ANS"]
        .iter()
        .enumerate()
        .map(|(i, w)| (w.to_string(), i as u32))
        .collect();
    let model = tokenizers::models::wordlevel::WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("<unk>".into())
        .build()
        .unwrap();
    let mut t = tokenizers::Tokenizer::new(model);
    t.with_pre_tokenizer(Some(
        tokenizers::pre_tokenizers::whitespace::WhitespaceSplit,
    ));
    t
}

fn tok(tcfg: Option<serde_json::Value>, mcfg: Option<serde_json::Value>) -> Tok {
    Tok::from_parts(
        word_tokenizer(),
        tcfg.as_ref(),
        mcfg.as_ref(),
        Path::new("t"),
    )
    .unwrap()
}

fn rec(p: &str, r: &str) -> Record {
    Record::pair(p, r)
}

#[test]
fn bos_rules_follow_tokenizer_config_then_config_json() {
    // Llama-3 style: bos_token named, no add_bos_token key -> add.
    assert_eq!(
        tok(Some(json!({"bos_token": "<s>", "eos_token": "</s>"})), None).bos,
        Some(1)
    );
    // Mistral style: explicit add_bos_token = true.
    assert_eq!(
        tok(
            Some(
                json!({"bos_token": {"content": "<s>"}, "eos_token": "</s>", "add_bos_token": true})
            ),
            None
        )
        .bos,
        Some(1)
    );
    // Explicitly off.
    assert_eq!(
        tok(
            Some(json!({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": false})),
            None
        )
        .bos,
        None
    );
    // Qwen2 style: bos_token null although config.json lists a bos id.
    let q = tok(
        Some(json!({"bos_token": null, "eos_token": "</s>"})),
        Some(json!({"bos_token_id": 1, "eos_token_id": 2})),
    );
    assert_eq!((q.bos, q.eos), (None, 2));
    // No tokenizer_config: config.json decides; eos may be a list.
    let c = tok(
        None,
        Some(json!({"bos_token_id": 1, "eos_token_id": [2, 8]})),
    );
    assert_eq!((c.bos, c.eos), (Some(1), 2));
    assert!(
        Tok::from_parts(word_tokenizer(), None, None, Path::new("t")).is_err(),
        "no EOS anywhere must be an error"
    );
}

#[test]
fn prompt_and_response_tokenised_separately_with_bos_and_eos() {
    let t = tok(Some(json!({"bos_token": "<s>", "eos_token": "</s>"})), None);
    let (ex, truncated) = tokenize_one(&rec("a b", "c a"), &t, "Q: {prompt} ANS", 64).unwrap();
    let ex = ex.unwrap();
    assert!(!truncated);
    assert_eq!(ex.ids, vec![1, 4, 5, 6, 8, 7, 5, 2]);
    assert_eq!(ex.label_start, 5); // labels: "c a" + EOS
                                   // Without BOS the prompt starts at 0.
    let t2 = tok(Some(json!({"bos_token": null, "eos_token": "</s>"})), None);
    let ex = tokenize_one(&rec("a", "b"), &t2, "{prompt}", 64)
        .unwrap()
        .0
        .unwrap();
    assert_eq!((ex.ids, ex.label_start), (vec![5, 6, 2], 1));
}

#[test]
fn long_examples_lose_the_end_of_the_response_and_overlong_prompts_are_dropped() {
    let t = tok(Some(json!({"bos_token": "<s>", "eos_token": "</s>"})), None);
    let (ex, truncated) = tokenize_one(&rec("a", "b c a b c"), &t, "{prompt}", 5).unwrap();
    let ex = ex.unwrap();
    assert!(truncated);
    assert_eq!(ex.ids, vec![1, 5, 6, 7, 5]);
    assert_eq!(ex.label_start, 2);
    let (none, _) = tokenize_one(&rec("a b c", "b"), &t, "{prompt}", 4).unwrap();
    assert!(none.is_none());
}

#[test]
fn batches_shift_targets_and_never_train_on_prompt_or_padding() {
    let a = Example {
        ids: vec![1, 4, 5, 6, 2],
        label_start: 3,
    };
    let b = Example {
        ids: vec![1, 7, 2],
        label_start: 2,
    };
    let keep_a = [1.0, 0.0];
    let keep_b = [1.0];
    let batch = make_batch(
        &[&a, &b],
        Some(&[&keep_a[..], &keep_b[..]]),
        0,
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(
        batch.input.to_vec2::<u32>().unwrap(),
        vec![vec![1, 4, 5, 6, 2], vec![1, 7, 2, 0, 0]]
    );
    // Position t predicts t+1: labels of `a` sit at 3, 4 -> targets at 2, 3.
    assert_eq!(
        batch.targets.to_vec2::<u32>().unwrap(),
        vec![vec![0, 0, 6, 2, 0], vec![0, 2, 0, 0, 0]]
    );
    assert_eq!(
        batch.weights.to_vec2::<f32>().unwrap(),
        vec![vec![0., 0., 1., 0., 0.], vec![0., 1., 0., 0., 0.]]
    );
    assert_eq!(batch.n_tokens, 2.0);
}

fn write(text: &str) -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), text).unwrap();
    f
}

#[test]
fn jsonl_errors_name_the_line() {
    let f =
        write("{\"prompt\": \"a\", \"response\": \"b\"}\n\n{\"prompt\": \"a\", \"response\": \n");
    let e = read_jsonl(f.path(), "prompt", "response")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!("{}:3:", f.path().display())) && e.contains("invalid JSON"),
        "{e}"
    );
    let f = write("{\"prompt\": \"a\", \"response\": \"b\"}\n{\"prompt\": \"a\"}\n");
    let e = read_jsonl(f.path(), "prompt", "response")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(":2:") && e.contains("missing field \"response\""),
        "{e}"
    );
    let f = write("\n\n");
    let e = read_jsonl(f.path(), "prompt", "response")
        .unwrap_err()
        .to_string();
    assert!(e.contains("empty"), "{e}");
    let f = write("{\"question\": \"q\", \"answer\": 42}\n");
    assert_eq!(
        read_jsonl(f.path(), "question", "answer").unwrap(),
        vec![rec("q", "42")]
    );
}
