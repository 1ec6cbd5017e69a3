//! Dataset formats, Hub file matching and chat templates (src/formats.rs).
//!
//! The fixtures under tests/fixtures/formats/ come from
//! scripts/make_format_fixtures.py: parquet files written by pyarrow with
//! their `to_pylist()` rows beside them, and chat renderings produced by
//! transformers' `render_jinja_template` (jinja2) for the real Qwen2.5,
//! Llama 3.1 and Mistral v0.3 templates. Nothing here touches the network.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use xtf_train::data::formats::*;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/formats")
        .join(name)
}

fn read_json(name: &str) -> Result<Value> {
    Ok(serde_json::from_str(&std::fs::read_to_string(fixture(
        name,
    ))?)?)
}

fn msg(role: &str, content: &str) -> Message {
    Message {
        role: role.into(),
        content: content.into(),
    }
}

/// A template built from an inline tokenizer_config.json.
fn inline_template(template: &str) -> Result<ChatTemplate> {
    let cfg = json!({"bos_token": "<s>", "eos_token": "</s>", "chat_template": template});
    Ok(ChatTemplate::from_tokenizer_config(&cfg)?.ok_or("no template")?)
}

// ---------------------------------------------------------------- parquet

#[test]
fn parquet_gsm8k_schema_rows_match_pyarrow() -> Result<()> {
    let rows = read_rows(&fixture("gsm8k_like.parquet"))?;
    assert_eq!(
        Value::Array(rows.clone()),
        read_json("gsm8k_like.expected.json")?
    );
    assert_eq!(rows.len(), 2);
    assert!(rows[1]["answer"]
        .as_str()
        .ok_or("answer")?
        .ends_with("#### 10"));
    Ok(())
}

#[test]
fn parquet_pubmedqa_schema_keeps_ints_structs_and_lists() -> Result<()> {
    let rows = read_rows(&fixture("pubmedqa_like.parquet"))?;
    assert_eq!(
        Value::Array(rows.clone()),
        read_json("pubmedqa_like.expected.json")?
    );
    assert_eq!(rows[0]["pubid"], json!(21645374));
    assert_eq!(
        rows[0]["context"]["labels"],
        json!(["BACKGROUND", "RESULTS"])
    );
    // An empty list stays an empty list, not null.
    assert_eq!(rows[1]["context"]["meshes"], json!([]));
    assert_eq!(rows[2]["final_decision"], json!("yes"));
    Ok(())
}

#[test]
fn parquet_messages_column_becomes_a_chat_record() -> Result<()> {
    let rows = read_rows(&fixture("messages_like.parquet"))?;
    assert_eq!(
        Value::Array(rows.clone()),
        read_json("messages_like.expected.json")?
    );
    assert_eq!(rows[1]["score"], Value::Null);
    let rec = to_record(&rows[0], "prompt", "response", "messages", 0)?;
    assert_eq!(
        rec,
        RawRecord::Chat {
            messages: vec![
                msg("system", "Be brief."),
                msg("user", "2+2?"),
                msg("assistant", "4")
            ]
        }
    );
    Ok(())
}

// ---------------------------------------------------------------- json / jsonl

#[test]
fn json_array_of_objects() -> Result<()> {
    let rows = read_rows(&fixture("rows.json"))?;
    assert_eq!(
        rows,
        vec![
            json!({"problem": "What is 1+1?", "solution": "2", "level": 1}),
            json!({"problem": "What is 2*3?", "solution": "6", "level": 2, "tags": ["arith"]}),
        ]
    );
    Ok(())
}

#[test]
fn json_object_of_objects_adds_id_in_file_order() -> Result<()> {
    let rows = read_rows(&fixture("by_id.json"))?;
    let ids: Vec<&str> = rows.iter().filter_map(|r| r["id"].as_str()).collect();
    // File order, not sorted order (16418930 < 21645374).
    assert_eq!(ids, ["21645374", "16418930"]);
    assert_eq!(
        rows[1],
        json!({"id": "16418930", "QUESTION": "Landolt C and snellen e acuity?",
               "CONTEXTS": ["Acuity depends on optotypes."], "final_decision": "no"})
    );
    Ok(())
}

#[test]
fn jsonl_skips_blank_lines_and_renders_numbers_as_text() -> Result<()> {
    let rows = read_rows(&fixture("rows.jsonl"))?;
    assert_eq!(rows.len(), 2);
    let rec = to_record(&rows[1], "prompt", "response", "messages", 1)?;
    assert_eq!(
        rec,
        RawRecord::Pair {
            prompt: "Count to 3.".into(),
            response: "123".into()
        }
    );
    Ok(())
}

#[test]
fn jsonl_malformed_line_is_named() -> Result<()> {
    let path = fixture("bad.jsonl");
    let err = read_rows(&path).err().ok_or("bad.jsonl should not parse")?;
    match &err {
        FormatError::File { path: p, line, .. } => {
            assert_eq!((p.as_path(), *line), (path.as_path(), 3));
        }
        other => return Err(format!("unexpected error {other}").into()),
    }
    assert!(
        err.to_string().contains("bad.jsonl:3: invalid JSON"),
        "{err}"
    );
    Ok(())
}

#[test]
fn unsupported_extension_and_non_object_rows_are_errors() -> Result<()> {
    let dir = tempdir()?;
    let csv = dir.join("x.csv");
    std::fs::write(&csv, "a,b\n")?;
    assert!(read_rows(&csv).is_err());
    let arr = dir.join("x.json");
    std::fs::write(&arr, "[{\"a\": 1}, 2]")?;
    let err = read_rows(&arr).err().ok_or("array with a number")?;
    assert!(err.to_string().contains("array element 1"), "{err}");
    let lines = dir.join("x.jsonl");
    std::fs::write(&lines, "{\"a\": 1}\n[1]\n")?;
    let err = read_rows(&lines).err().ok_or("jsonl with an array")?;
    assert!(err.to_string().contains("x.jsonl:2"), "{err}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

fn tempdir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "xtf-formats-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

// ---------------------------------------------------------------- to_record

#[test]
fn to_record_errors_name_the_field_and_row() -> Result<()> {
    let err = to_record(
        &json!({"question": "q"}),
        "question",
        "answer",
        "messages",
        7,
    )
    .err()
    .ok_or("missing answer")?;
    assert_eq!(err.to_string(), "row 7: field `answer`: missing");
    let err = to_record(
        &json!({"question": "q", "answer": [1]}),
        "question",
        "answer",
        "messages",
        2,
    )
    .err()
    .ok_or("array answer")?;
    assert!(
        err.to_string()
            .starts_with("row 2: field `answer`: expected a string or a number"),
        "{err}"
    );
    let bad_chat = json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]});
    let err = to_record(&bad_chat, "p", "r", "messages", 3)
        .err()
        .ok_or("no content")?;
    assert_eq!(
        err.to_string(),
        "row 3: field `messages[1].content`: missing"
    );
    Ok(())
}

#[test]
fn to_record_prefers_messages_and_joins_text_parts() -> Result<()> {
    let row = json!({
        "prompt": "ignored", "response": "ignored",
        "conversation": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    });
    let rec = to_record(&row, "prompt", "response", "conversation", 0)?;
    assert_eq!(
        rec,
        RawRecord::Chat {
            messages: vec![msg("user", "ab")]
        }
    );
    // A null messages field falls back to the pair.
    let row = json!({"prompt": "p", "response": 2.5, "messages": null});
    let rec = to_record(&row, "prompt", "response", "messages", 0)?;
    assert_eq!(
        rec,
        RawRecord::Pair {
            prompt: "p".into(),
            response: "2.5".into()
        }
    );
    Ok(())
}

// ---------------------------------------------------------------- sources

#[test]
fn parse_source_local_and_hub_forms() -> Result<()> {
    assert_eq!(
        parse_source("data/train.jsonl")?,
        DataSource::Local("data/train.jsonl".into())
    );
    let hub = |repo: &str, config: Option<&str>, split: &str| DataSource::Hub {
        repo: repo.into(),
        config: config.map(str::to_string),
        split: split.into(),
    };
    assert_eq!(
        parse_source("hf://AI-MO/NuminaMath-CoT")?,
        hub("AI-MO/NuminaMath-CoT", None, "train")
    );
    assert_eq!(
        parse_source("hf://HuggingFaceH4/MATH-500/test")?,
        hub("HuggingFaceH4/MATH-500", None, "test")
    );
    assert_eq!(
        parse_source("hf://openai/gsm8k/main/test")?,
        hub("openai/gsm8k", Some("main"), "test")
    );
    assert_eq!(
        parse_source("hf://openai/gsm8k/main/test/")?,
        hub("openai/gsm8k", Some("main"), "test")
    );
    for bad in [
        "hf://",
        "hf://openai",
        "hf://openai//x",
        "hf://a/b/c/d/e",
        "",
    ] {
        assert!(parse_source(bad).is_err(), "{bad} should be rejected");
    }
    Ok(())
}

fn listing(files: &[&str]) -> Vec<String> {
    files.iter().map(|f| f.to_string()).collect()
}

#[test]
fn hub_files_gsm8k_configs() -> Result<()> {
    let files = listing(&[
        ".gitattributes",
        "README.md",
        "main/test-00000-of-00001.parquet",
        "main/train-00000-of-00001.parquet",
        "socratic/test-00000-of-00001.parquet",
        "socratic/train-00000-of-00001.parquet",
    ]);
    assert_eq!(
        select_split_files(&files, Some("main"), "train")?,
        ["main/train-00000-of-00001.parquet"]
    );
    assert_eq!(
        select_split_files(&files, Some("socratic"), "test")?,
        ["socratic/test-00000-of-00001.parquet"]
    );
    let err = select_split_files(&files, None, "train")
        .err()
        .ok_or("ambiguous config")?;
    assert!(err.contains("main, socratic"), "{err}");
    // A config given where the split goes matches nothing rather than
    // mixing the config's train and test files.
    let err = select_split_files(&files, None, "main")
        .err()
        .ok_or("config as split")?;
    assert!(err.contains("configs seen: main, socratic"), "{err}");
    let err = select_split_files(&files, Some("main"), "validation")
        .err()
        .ok_or("no split")?;
    assert!(err.contains("splits seen: test, train"), "{err}");
    Ok(())
}

#[test]
fn hub_files_single_config_datasets() -> Result<()> {
    let pubmed = listing(&[
        "README.md",
        "pqa_artificial/train-00000-of-00001.parquet",
        "pqa_labeled/train-00000-of-00001.parquet",
        "pqa_unlabeled/train-00000-of-00001.parquet",
    ]);
    assert_eq!(
        select_split_files(&pubmed, Some("pqa_labeled"), "train")?,
        ["pqa_labeled/train-00000-of-00001.parquet"]
    );
    assert!(select_split_files(&pubmed, None, "train").is_err());
    // One config only: it is picked without being named.
    let humaneval = listing(&["README.md", "openai_humaneval/test-00000-of-00001.parquet"]);
    assert_eq!(
        select_split_files(&humaneval, None, "test")?,
        ["openai_humaneval/test-00000-of-00001.parquet"]
    );
    let math500 = listing(&[".gitattributes", "README.md", "test.jsonl"]);
    assert_eq!(select_split_files(&math500, None, "test")?, ["test.jsonl"]);
    assert_eq!(
        select_split_files(&math500, Some("default"), "test")?,
        ["test.jsonl"]
    );
    assert!(select_split_files(&math500, None, "train").is_err());
    Ok(())
}

#[test]
fn hub_files_sharded_data_dir_in_order() -> Result<()> {
    let numina = listing(&[
        "README.md",
        "data/test-00000-of-00001.parquet",
        "data/train-00002-of-00005.parquet",
        "data/train-00000-of-00005.parquet",
        "data/train-00004-of-00005.parquet",
        "data/train-00001-of-00005.parquet",
        "data/train-00003-of-00005.parquet",
    ]);
    let got = select_split_files(&numina, None, "train")?;
    let want: Vec<String> = (0..5)
        .map(|i| format!("data/train-0000{i}-of-00005.parquet"))
        .collect();
    assert_eq!(got, want);
    assert_eq!(
        select_split_files(&numina, None, "test")?,
        ["data/test-00000-of-00001.parquet"]
    );
    Ok(())
}

#[test]
fn hub_files_split_prefix_needs_a_dash_and_split_dirs_count() -> Result<()> {
    let ultrachat = listing(&[
        "data/train_sft-00000-of-00003.parquet",
        "data/test_sft-00000-of-00001.parquet",
    ]);
    assert!(select_split_files(&ultrachat, None, "train").is_err());
    assert_eq!(
        select_split_files(&ultrachat, None, "train_sft")?,
        ["data/train_sft-00000-of-00003.parquet"]
    );
    // The Hub's parquet-conversion layout: <config>/<split>/NNNN.parquet.
    let converted = listing(&[
        "default/train/0000.parquet",
        "default/train/0001.parquet",
        "default/test/0000.parquet",
    ]);
    assert_eq!(
        select_split_files(&converted, None, "train")?,
        ["default/train/0000.parquet", "default/train/0001.parquet"]
    );
    Ok(())
}

/// The offline path of `resolve_hub` on a hand-built hf-hub cache: the
/// listing is the cached snapshot, and nothing touches the network.
#[test]
fn hub_offline_resolves_from_the_local_cache() -> Result<()> {
    if !crate::common::own_process("formats::hub_offline_resolves_from_the_local_cache") {
        return Ok(());
    }
    let home = tempdir()?.join("hf_home");
    let repo_dir = home.join("hub/datasets--openai--gsm8k");
    let snap = repo_dir.join("snapshots/0123abcd");
    std::fs::create_dir_all(snap.join("main"))?;
    std::fs::create_dir_all(snap.join("socratic"))?;
    std::fs::create_dir_all(repo_dir.join("refs"))?;
    std::fs::write(repo_dir.join("refs/main"), "0123abcd")?;
    std::fs::copy(
        fixture("gsm8k_like.parquet"),
        snap.join("main/train-00000-of-00001.parquet"),
    )?;
    std::fs::write(snap.join("socratic/train-00000-of-00001.parquet"), b"")?;
    std::fs::write(snap.join("README.md"), "# gsm8k")?;
    // Safe: this process runs only this test (`own_process`).
    std::env::set_var("HF_HOME", &home);
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let files = resolve_hub("openai/gsm8k", Some("main"), "train")?;
    assert_eq!(files, [snap.join("main/train-00000-of-00001.parquet")]);
    assert_eq!(read_rows(&files[0])?.len(), 2);
    let err = resolve_hub("openai/gsm8k", None, "train")
        .err()
        .ok_or("ambiguous")?;
    assert!(
        err.to_string()
            .starts_with("hub dataset openai/gsm8k: split `train` exists in several configs"),
        "{err}"
    );
    let err = resolve_hub("openai/not-cached", None, "train")
        .err()
        .ok_or("not cached")?;
    assert!(
        err.to_string().contains("not in the local hub cache"),
        "{err}"
    );
    std::fs::remove_dir_all(home.parent().ok_or("parent")?)?;
    Ok(())
}

// ---------------------------------------------------------------- chat templates

#[test]
fn chat_templates_match_transformers_renderings() -> Result<()> {
    let expected = read_json("chat_expected.json")?;
    let cases = expected["cases"].as_array().ok_or("cases")?;
    assert_eq!(cases.len(), 16);
    for case in cases {
        let file = case["template"].as_str().ok_or("template")?;
        let label = format!("{file} / {}", case["conversation"]);
        let bos = read_json(file)?["bos_token"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        // The real tokenizers of these templates all add their bos_token
        // (Llama-3.1's post-processor, Mistral's add_bos_token), which is
        // what the fixture's split assumes.
        let tmpl = ChatTemplate::from_file(&fixture(file))?
            .ok_or("no template")?
            .with_added_bos(Some(bos.clone()).filter(|b| !b.is_empty()));
        let messages: Vec<Message> = serde_json::from_value(case["messages"].clone())?;
        let rendered = &case["rendered"];
        if let Some(want_err) = rendered["error"].as_str() {
            let err = tmpl
                .render(&messages, false)
                .err()
                .ok_or(format!("{label}: should raise"))?;
            assert!(err.to_string().contains(want_err), "{label}: {err}");
            continue;
        }
        for (key, gen) in [("false", false), ("true", true)] {
            let got = tmpl.render(&messages, gen)?;
            assert_eq!(
                got,
                rendered[key].as_str().ok_or("rendering")?,
                "{label}, add_generation_prompt={gen}"
            );
        }
        let Some(split) = case.get("split") else {
            continue;
        };
        if split.get("error").is_some() {
            let err = tmpl
                .split_prompt_response(&messages)
                .err()
                .ok_or(format!("{label}: should not split"))?;
            assert!(
                err.to_string().contains(file),
                "{label}: error should name the template: {err}"
            );
            continue;
        }
        let (prompt, response) = tmpl.split_prompt_response(&messages)?;
        assert_eq!(prompt, split["prompt"].as_str().ok_or("prompt")?, "{label}");
        assert_eq!(
            response,
            split["response"].as_str().ok_or("response")?,
            "{label}"
        );
        // prompt + response is the full rendering, less the BOS the trainer adds.
        let full = rendered["false"].as_str().ok_or("full")?;
        let bos = if full.starts_with(&bos) {
            bos.as_str()
        } else {
            ""
        };
        assert_eq!(format!("{bos}{prompt}{response}"), full, "{label}");
    }
    Ok(())
}

#[test]
fn chat_template_config_forms() -> Result<()> {
    assert!(ChatTemplate::from_tokenizer_config(&json!({"eos_token": "</s>"}))?.is_none());
    // A list of named templates uses "default"; AddedToken objects give their content.
    let cfg = json!({
        "bos_token": {"content": "<s>", "__type": "AddedToken"},
        "chat_template": [
            {"name": "tool_use", "template": "TOOLS"},
            {"name": "default", "template": "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"}
        ]
    });
    let t = ChatTemplate::from_tokenizer_config(&cfg)?.ok_or("no template")?;
    assert_eq!(t.render(&[msg("user", "hi")], false)?, "<s>[user]hi");
    let bad = json!({"chat_template": [{"name": "tool_use", "template": "x"}]});
    assert!(ChatTemplate::from_tokenizer_config(&bad).is_err());
    let syntax = json!({"chat_template": "{% for m in messages %}"});
    assert!(ChatTemplate::from_tokenizer_config(&syntax).is_err());
    Ok(())
}

#[test]
fn tojson_writes_what_python_json_dumps_writes() -> Result<()> {
    // Expected strings from Python: json.dumps(x, ensure_ascii=False) etc.
    let t = inline_template(concat!(
        "{{ messages | tojson }}|{{ messages | tojson(indent=2) }}|",
        "{{ [0.00001, 1e16, 0.1, 100.0, 123456789.0, 0.00000015, 2.5, 1e15, 0.0001, 3, true, none, {'b': 1, 'a': []}] | tojson }}|",
        "{{ {'b': 1, 'a': 2} | tojson(sort_keys=true, separators=[',', ':']) }}|",
        "{{ messages[0].content | tojson(ensure_ascii=true) }}"
    ))?;
    let got = t.render(&[msg("user", "a<b \"q\" é\n\u{1}")], false)?;
    let want = [
        r#"[{"role": "user", "content": "a<b \"q\" é\n\u0001"}]"#,
        "[\n  {\n    \"role\": \"user\",\n    \"content\": \"a<b \\\"q\\\" é\\n\\u0001\"\n  }\n]",
        r#"[1e-05, 1e+16, 0.1, 100.0, 123456789.0, 1.5e-07, 2.5, 1000000000000000.0, 0.0001, 3, true, null, {"b": 1, "a": []}]"#,
        r#"{"a":2,"b":1}"#,
        r#""a<b \"q\" \u00e9\n\u0001""#,
    ]
    .join("|");
    assert_eq!(got, want);
    Ok(())
}

#[test]
fn python_string_methods_loop_controls_and_namespace() -> Result<()> {
    let t = inline_template(concat!(
        "{%- set ns = namespace(n=0) -%}",
        "{%- for m in messages -%}",
        "{%- if m.content.startswith('skip') %}{% continue %}{% endif -%}",
        "{%- set ns.n = ns.n + 1 -%}",
        "{{ m.content.strip().upper() }};",
        "{%- endfor -%}",
        "{{ ns.n }}"
    ))?;
    let got = t.render(
        &[
            msg("user", "  a  "),
            msg("user", "skip me"),
            msg("user", "b"),
        ],
        false,
    )?;
    assert_eq!(got, "A;B;2");
    Ok(())
}

#[test]
fn raise_exception_becomes_a_template_error() -> Result<()> {
    let t =
        inline_template("{{ raise_exception('roles must alternate') }}")?.with_name("my-template");
    let err = t.render(&[], false).err().ok_or("should raise")?;
    let text = err.to_string();
    assert!(text.starts_with("chat template my-template:"), "{text}");
    assert!(text.contains("roles must alternate"), "{text}");
    Ok(())
}

#[test]
fn strftime_now_is_defined_and_formats_today() -> Result<()> {
    let t = inline_template(
        "{% if strftime_now is defined %}{{ strftime_now('%Y-%m-%d') }}{% endif %}",
    )?;
    let got = t.render(&[], false)?;
    let parts: Vec<u32> = got
        .split('-')
        .map(str::parse)
        .collect::<std::result::Result<_, _>>()?;
    assert!(
        parts.len() == 3 && parts[0] >= 2024 && (1..=12).contains(&parts[1]),
        "{got}"
    );
    Ok(())
}

#[test]
fn split_needs_an_assistant_turn_and_drops_later_messages() -> Result<()> {
    let tmpl =
        ChatTemplate::from_file(&fixture("qwen2.5_tokenizer_config.json"))?.ok_or("no template")?;
    assert!(tmpl.split_prompt_response(&[msg("user", "hi")]).is_err());
    let chat = [
        msg("user", "hi"),
        msg("assistant", "hello"),
        msg("user", "bye"),
    ];
    let (_, response) = tmpl.split_prompt_response(&chat)?;
    assert_eq!(response, "hello<|im_end|>\n");
    Ok(())
}
