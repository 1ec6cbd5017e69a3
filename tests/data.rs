//! The tokenisation contract on a word-level tokenizer whose ids we know by hand.

use candle_core::Device;
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;
use xtf_train::data::tokenizer::Tok;
use xtf_train::data::{make_batch, read_jsonl, tokenize_one, Example, Record};

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

/// The word tokenizer with a Llama-3-style post-processor that puts `<s>`
/// in front of every encoding (`TemplateProcessing "<s> $A"`).
fn bos_adding_tokenizer() -> tokenizers::Tokenizer {
    let mut t = word_tokenizer();
    let pp = tokenizers::processors::template::TemplateProcessing::builder()
        .try_single("<s> $A")
        .unwrap()
        .special_tokens(vec![("<s>", 1)])
        .build()
        .unwrap();
    t.with_post_processor(Some(pp));
    t
}

fn tok(tcfg: Option<serde_json::Value>, mcfg: Option<serde_json::Value>) -> Tok {
    Tok::from_parts(
        bos_adding_tokenizer(),
        tcfg.as_ref(),
        mcfg.as_ref(),
        Path::new("t"),
    )
    .unwrap()
}

fn rec(p: &str, r: &str) -> Record {
    Record::pair(p, r)
}

fn bos_of(
    t: tokenizers::Tokenizer,
    tcfg: serde_json::Value,
    mcfg: Option<serde_json::Value>,
) -> Option<u32> {
    Tok::from_parts(t, Some(&tcfg), mcfg.as_ref(), Path::new("t"))
        .unwrap()
        .bos
}

#[test]
fn bos_follows_what_the_tokenizer_itself_adds() {
    let named = json!({"bos_token": "<s>", "eos_token": "</s>"});
    // Llama-3 style: no add_bos_token key, the post-processor adds BOS.
    assert_eq!(bos_of(bos_adding_tokenizer(), named.clone(), None), Some(1));
    // SmolLM2 style: a bos_token is named but nothing adds it.
    assert_eq!(bos_of(word_tokenizer(), named.clone(), None), None);
    // Mistral style: explicit add_bos_token = true, whatever the post-processor.
    let mistral =
        json!({"bos_token": {"content": "<s>"}, "eos_token": "</s>", "add_bos_token": true});
    assert_eq!(bos_of(word_tokenizer(), mistral, None), Some(1));
    // Explicitly off wins over a post-processor that would add it.
    let off = json!({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": false});
    assert_eq!(bos_of(bos_adding_tokenizer(), off, None), None);
    // transformers' Llama tokenizer classes default add_bos_token to true.
    let class =
        json!({"bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "LlamaTokenizerFast"});
    assert_eq!(bos_of(word_tokenizer(), class, None), Some(1));
    // Qwen2 style: bos_token null although config.json lists a bos id.
    let q = tok(
        Some(json!({"bos_token": null, "eos_token": "</s>", "add_bos_token": false})),
        Some(json!({"bos_token_id": 1, "eos_token_id": 2})),
    );
    assert_eq!((q.bos, q.eos), (None, 2));
    let q = Tok::from_parts(
        word_tokenizer(),
        Some(&json!({"bos_token": null, "eos_token": "</s>"})),
        Some(&json!({"bos_token_id": 1, "eos_token_id": 2})),
        Path::new("t"),
    )
    .unwrap();
    assert_eq!((q.bos, q.eos), (None, 2));
    // No tokenizer_config: the post-processor decides, not config.json's
    // bos_token_id; eos may be a list.
    let c = tok(
        None,
        Some(json!({"bos_token_id": 1, "eos_token_id": [2, 8]})),
    );
    assert_eq!((c.bos, c.eos), (Some(1), 2));
    let c = Tok::from_parts(
        word_tokenizer(),
        None,
        Some(&json!({"bos_token_id": 1, "eos_token_id": [2, 8]})),
        Path::new("t"),
    )
    .unwrap();
    assert_eq!((c.bos, c.eos), (None, 2));
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
    let t2 = tok(
        Some(json!({"bos_token": null, "eos_token": "</s>", "add_bos_token": false})),
        None,
    );
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

// ------------------------------------------------- data sources in [data]

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/formats")
        .join(name)
}

fn data_section(extra: &str) -> xtf_train::config::DataSection {
    #[derive(serde::Deserialize)]
    struct W {
        data: xtf_train::config::DataSection,
    }
    toml::from_str::<W>(&format!("[data]\ntrain = \"x\"\n{extra}"))
        .unwrap()
        .data
}

fn qwen_template() -> xtf_train::data::formats::ChatTemplate {
    xtf_train::data::formats::ChatTemplate::from_file(&fixture("qwen2.5_tokenizer_config.json"))
        .unwrap()
        .unwrap()
}

#[test]
fn parquet_and_json_sources_give_the_pyarrow_rows() {
    use xtf_train::data::load_records;
    let d = data_section("prompt_field = \"question\"\nresponse_field = \"answer\"");
    let src = fixture("gsm8k_like.parquet").display().to_string();
    let got = load_records(&src, &d, None).unwrap();
    let want: Vec<serde_json::Value> = serde_json::from_str(
        &std::fs::read_to_string(fixture("gsm8k_like.expected.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(
            g,
            &Record::pair(
                w["question"].as_str().unwrap(),
                w["answer"].as_str().unwrap()
            )
        );
    }
    let d = data_section("prompt_field = \"problem\"\nresponse_field = \"solution\"");
    let src = fixture("rows.json").display().to_string();
    assert_eq!(
        load_records(&src, &d, None).unwrap(),
        vec![
            Record::pair("What is 1+1?", "2"),
            Record::pair("What is 2*3?", "6")
        ]
    );
    // A row without the field: the error names the file and the row.
    let d = data_section("prompt_field = \"problem\"\nresponse_field = \"answer\"");
    let e = load_records(&src, &d, None).unwrap_err().to_string();
    assert!(e.contains("rows.json:1") && e.contains("\"answer\""), "{e}");
}

#[test]
fn chat_rows_are_rendered_with_the_chat_template_and_get_no_extra_eos() {
    use xtf_train::data::load_records;
    let src = fixture("messages_like.parquet").display().to_string();
    // Without chat_template a single exchange is a pair (system dropped).
    assert_eq!(
        load_records(&src, &data_section(""), None).unwrap(),
        vec![
            Record::pair("2+2?", "4"),
            Record::pair("Capital of France?", "Paris.")
        ]
    );
    let d = data_section("chat_template = true");
    // With it, a model without a template is an error naming the file and row.
    let e = load_records(&src, &d, None).unwrap_err().to_string();
    assert!(
        e.contains("messages_like.parquet:1") && e.contains("chat_template"),
        "{e}"
    );
    let got = load_records(&src, &d, Some(&qwen_template())).unwrap();
    // Qwen2.5's ChatML, written out by hand (its default system message
    // appears when the chat has none).
    assert_eq!(
        got,
        vec![
            Record {
                prompt: "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n".into(),
                response: "4<|im_end|>\n".into(),
                chat: true
            },
            Record {
                prompt: "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n".into(),
                response: "Paris.<|im_end|>\n".into(),
                chat: true
            },
        ]
    );
    // `chat_template = true` renders prompt/response rows as a chat too.
    let d = data_section("prompt_field = \"problem\"\nresponse_field = \"solution\"\nchat_template = true\nsystem = \"S\"");
    let src = fixture("rows.json").display().to_string();
    let got = load_records(&src, &d, Some(&qwen_template())).unwrap();
    assert_eq!(
        got[0],
        Record {
            prompt: "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nWhat is 1+1?<|im_end|>\n<|im_start|>assistant\n".into(),
            response: "2<|im_end|>\n".into(),
            chat: true
        }
    );
    // A chat record's prompt is used as is and no EOS follows its response.
    let t = tok(Some(json!({"bos_token": "<s>", "eos_token": "</s>"})), None);
    let chat = Record {
        prompt: "Q: a".into(),
        response: "b c".into(),
        chat: true,
    };
    let (ex, _) = tokenize_one(&chat, &t, "ANS {prompt} ANS", 64).unwrap();
    assert_eq!(
        ex.unwrap(),
        Example {
            ids: vec![1, 4, 5, 6, 7],
            label_start: 3
        }
    );
}

#[test]
fn prompt_fields_limit_and_chat_roles() {
    use xtf_train::data::load_records;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.jsonl");
    let rows = [
        json!({"instruction": "Answer.", "input": "Is it?", "output": "yes"}),
        json!({"instruction": "Answer.", "input": "", "output": "no"}),
        json!({"chat_rounds": [{"role": "human", "content": "hi"}, {"role": "bot", "content": "yo"}]}),
        json!({"chat_rounds": [{"role": "human", "content": "a"}, {"role": "bot", "content": "b"},
                               {"role": "human", "content": "c"}, {"role": "bot", "content": "d"}]}),
    ];
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(&p, text).unwrap();
    let src = p.display().to_string();
    let fields = "prompt_fields = [\"instruction\", \"input\"]\nresponse_field = \"output\"\nmessages_field = \"chat_rounds\"\n";
    let d = data_section(&format!("{fields}limit = 3"));
    assert_eq!(
        load_records(&src, &d, None).unwrap(),
        vec![
            Record::pair("Answer.\nIs it?", "yes"),
            Record::pair("Answer.", "no"),
            Record::pair("hi", "yo"),
        ]
    );
    // The fourth row is a two-round chat: it needs the chat template.
    let e = load_records(&src, &data_section(fields), None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("d.jsonl:4") && e.contains("chat_template"),
        "{e}"
    );
    let d = data_section(&format!("{fields}chat_template = true"));
    let got = load_records(&src, &d, Some(&qwen_template())).unwrap();
    assert_eq!(got[3].response, "d<|im_end|>\n");
    assert!(got[3]
        .prompt
        .ends_with("<|im_start|>user\nc<|im_end|>\n<|im_start|>assistant\n"));
    assert!(got[3]
        .prompt
        .contains("<|im_start|>assistant\nb<|im_end|>\n"));
}

/// A byte-level BPE without merges (one token per byte) that knows
/// `specials` as added special tokens, optionally with a Llama-3-style
/// post-processor putting `bos` in front: enough to see which special
/// tokens a chat's ids hold, whatever the real vocabulary.
fn byte_tokenizer(specials: &[&str], bos: Option<&str>) -> tokenizers::Tokenizer {
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    let vocab: tokenizers::models::bpe::Vocab = ByteLevel::alphabet()
        .into_iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), i as u32))
        .collect();
    let bpe = tokenizers::models::bpe::BPE::builder()
        .vocab_and_merges(vocab, vec![])
        .build()
        .unwrap();
    let mut t = tokenizers::Tokenizer::new(bpe);
    t.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    t.with_decoder(Some(ByteLevel::default()));
    let added: Vec<_> = specials
        .iter()
        .map(|s| tokenizers::AddedToken::from(s.to_string(), true))
        .collect();
    t.add_special_tokens(&added);
    if let Some(b) = bos {
        let id = t.token_to_id(b).unwrap();
        let pp = tokenizers::processors::template::TemplateProcessing::builder()
            .try_single(format!("{b} $A"))
            .unwrap()
            .special_tokens(vec![(b, id)])
            .build()
            .unwrap();
        t.with_post_processor(Some(pp));
    }
    t
}

/// Issue 26: every chat's ids are transformers' `tokenizer(apply_chat_template(
/// chat), add_special_tokens=False)` (the renderings in chat_expected.json,
/// saved from transformers) split at the generation prompt, for each
/// committed template with the BOS rule of its real tokenizer — and for
/// SmolLM2's, whose `bos_token` `<|im_start|>` is never added, so the
/// rendering's leading `<|im_start|>` must stay in the text.
#[test]
fn chat_ids_are_the_whole_rendering_tokenised_once() {
    use xtf_train::data::formats::{ChatTemplate, Message};
    let specials = [
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
        "<|begin_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
        "<s>",
        "</s>",
        "[INST]",
        "[/INST]",
    ];
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("chat_expected.json")).unwrap())
            .unwrap();
    // (fixture config, keys of the real tokenizer_config.json the fixture
    // leaves out, BOS added by the real tokenizer.json's post-processor)
    let qwen = "qwen2.5_tokenizer_config.json";
    let families = [
        (qwen, json!({}), None, "qwen2.5"),
        (
            "llama3.1_tokenizer_config.json",
            json!({}),
            Some("<|begin_of_text|>"),
            "llama3.1",
        ),
        (
            "mistral0.3_tokenizer_config.json",
            json!({"add_bos_token": true}),
            None,
            "mistral0.3",
        ),
        // SmolLM2's GGUF: ChatML, bos_token named <|im_start|>, not added.
        (qwen, json!({"bos_token": "<|im_start|>"}), None, "smollm2"),
    ];
    let mut checked = 0;
    for (file, extra, pp_bos, label) in families {
        let mut tcfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fixture(file)).unwrap()).unwrap();
        for (k, v) in extra.as_object().unwrap() {
            tcfg[k] = v.clone();
        }
        let t = Tok::from_parts(
            byte_tokenizer(&specials, pp_bos),
            Some(&tcfg),
            None,
            Path::new(file),
        )
        .unwrap();
        let tmpl = ChatTemplate::from_tokenizer_config(&tcfg)
            .unwrap()
            .unwrap()
            .with_added_bos(t.bos_text());
        let cases = expected["cases"].as_array().unwrap().iter();
        let splits =
            |c: &&serde_json::Value| c.get("split").is_some_and(|s| s.get("error").is_none());
        for case in cases.filter(|c| c["template"] == file).filter(splits) {
            let messages: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
            let (prompt, response) = tmpl.split_prompt_response(&messages).unwrap();
            let rec = Record {
                prompt,
                response,
                chat: true,
            };
            let (ex, _) = tokenize_one(&rec, &t, "{prompt}", 1 << 16).unwrap();
            let ex = ex.unwrap();
            // transformers' rendering of the chat up to the last assistant
            // turn, and the generation prompt it starts with.
            let full = case["rendered"]["false"].as_str().unwrap();
            let want_response = case["split"]["response"].as_str().unwrap();
            let gen_prompt = full.strip_suffix(want_response).unwrap();
            let want = t.inner.encode(full, false).unwrap().get_ids().to_vec();
            let want_start = t.inner.encode(gen_prompt, false).unwrap().len();
            let at = format!("{label} / {}", case["conversation"]);
            assert_eq!(ex.ids, want, "{at}");
            assert_eq!(ex.label_start, want_start, "{at}");
            let firsts: Vec<String> = ex.ids[..2].iter().map(|&i| t.token_str(i)).collect();
            match label {
                "llama3.1" => assert_eq!(firsts[0], "<|begin_of_text|>", "{at}"),
                "mistral0.3" => assert_eq!(firsts[..2], ["<s>", "[INST]"], "{at}"),
                _ => assert_eq!(firsts[0], "<|im_start|>", "{at}"),
            }
            // Exactly one BOS, where the tokenizer adds one.
            if let Some(b) = t.bos {
                assert_eq!(ex.ids.iter().filter(|&&i| i == b).count(), 1, "{at}");
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 11);
}

/// Issue 25: a huge record costs memory in proportion to max_seq_len. Its
/// text is cut before tokenisation ([`Tok::text_budget`]), and the kept
/// tokens are exactly those of the whole text tokenised and truncated.
#[test]
fn huge_records_are_cut_before_tokenisation_keeping_every_token_that_fits() {
    let t = Tok::from_parts(
        byte_tokenizer(&["</s>"], None),
        Some(&json!({"eos_token": "</s>"})),
        None,
        Path::new("t"),
    )
    .unwrap();
    assert_eq!(t.max_token_bytes, 4, "the longest entry is `</s>`");
    let max_seq_len = 100;
    let budget = t.text_budget(max_seq_len);
    assert_eq!(budget, 2 * 101 * 4 + 1024);
    let prompt = "héllo ".repeat(3);
    let response = "ünïcode wörds and 123 ".repeat(10_000); // 250 KB
    assert!(response.len() > 100 * budget);
    let rec = rec(&prompt, &response);
    let (ex, truncated) = tokenize_one(&rec, &t, "Q: {prompt}\nA: ", max_seq_len).unwrap();
    let ex = ex.unwrap();
    assert!(truncated);
    // Independently: the whole texts tokenised, then cut to max_seq_len.
    let mut want = t
        .inner
        .encode(format!("Q: {prompt}\nA: "), false)
        .unwrap()
        .get_ids()
        .to_vec();
    let label_start = want.len();
    want.extend(t.inner.encode(response.as_str(), false).unwrap().get_ids());
    want.truncate(max_seq_len);
    assert_eq!(
        ex,
        Example {
            ids: want,
            label_start
        }
    );
    let (_, stats) =
        xtf_train::data::tokenize(&[rec, self::rec("a", "b")], &t, "{prompt}", max_seq_len)
            .unwrap();
    assert_eq!((stats.cut, stats.truncated, stats.rows.len()), (1, 1, 2));
}
