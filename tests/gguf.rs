//! Tests for the GGUF converter: synthetic files written with candle's GGUF
//! writer (every error path, the Q/K un-permutation, a full tiny conversion),
//! plus the real SmolLM2 checkpoint when `../shared/models` is present.

use candle_core::quantized::gguf_file::{self, Value as GValue};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};
use xtf_train::model::gguf::{
    convert, hf_name, merges_from_scores, unpermute_qk, GgufError, GgufFile,
};

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("gguf-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// llama.cpp's forward permutation (convert_hf_to_gguf.py `LlamaModel.permute`),
/// re-expressed with candle ops, to check that `unpermute_qk` inverts it.
fn llama_cpp_permute(t: &Tensor, n_head: usize) -> Tensor {
    let dims = t.dims().to_vec();
    let half = dims[0] / n_head / 2;
    let cols: usize = dims[1..].iter().product();
    t.reshape((n_head, 2, half, cols))
        .and_then(|t| t.transpose(1, 2))
        .and_then(|t| t.contiguous())
        .and_then(|t| t.reshape(dims))
        .expect("permute")
}

struct Tiny {
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    inter: usize,
    layers: usize,
    tokens: Vec<String>,
}

impl Tiny {
    fn new() -> Self {
        // Byte-level vocabulary: the 256 byte symbols, a few merges, two specials.
        let mut tokens: Vec<String> = vec!["<|endoftext|>".into(), "<|im_start|>".into()];
        for b in 0..=255u8 {
            tokens.push(byte_sym(b).to_string());
        }
        for t in [
            "he", "ll", "hell", "hello", "Ġw", "Ġwo", "Ġwor", "ld", "Ġworld",
        ] {
            tokens.push(t.into());
        }
        Self {
            hidden: 8,
            heads: 2,
            kv_heads: 1,
            head_dim: 4,
            inter: 12,
            layers: 2,
            tokens,
        }
    }

    fn vocab(&self) -> usize {
        self.tokens.len()
    }

    /// HF-layout weights (deterministic), keyed by HF name.
    fn hf_weights(&self) -> Vec<(String, Tensor)> {
        let (h, q, kv, i, v) = (
            self.hidden,
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
            self.inter,
            self.vocab(),
        );
        let mut n = 0f32;
        let mut mk = |shape: &[usize]| {
            let count: usize = shape.iter().product();
            let data: Vec<f32> = (0..count).map(|k| ((k as f32 + n) * 0.37).sin()).collect();
            n += 1.0;
            Tensor::from_vec(data, shape, &Device::Cpu).expect("tensor")
        };
        let mut w = vec![
            ("model.embed_tokens.weight".to_string(), mk(&[v, h])),
            ("model.norm.weight".to_string(), mk(&[h])),
        ];
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            for (name, shape) in [
                ("input_layernorm.weight", vec![h]),
                ("post_attention_layernorm.weight", vec![h]),
                ("self_attn.q_proj.weight", vec![q, h]),
                ("self_attn.k_proj.weight", vec![kv, h]),
                ("self_attn.v_proj.weight", vec![kv, h]),
                ("self_attn.o_proj.weight", vec![h, q]),
                ("mlp.gate_proj.weight", vec![i, h]),
                ("mlp.up_proj.weight", vec![i, h]),
                ("mlp.down_proj.weight", vec![h, i]),
            ] {
                w.push((format!("{p}.{name}"), mk(&shape)));
            }
        }
        w
    }

    fn metadata(&self, arch: &str) -> Vec<(String, GValue)> {
        let a = |k: &str| format!("{arch}.{k}");
        let mut types = vec![GValue::I32(3), GValue::I32(3)];
        types.extend((2..self.vocab()).map(|_| GValue::I32(1)));
        vec![
            ("general.architecture".into(), GValue::String(arch.into())),
            (a("block_count"), GValue::U32(self.layers as u32)),
            (a("context_length"), GValue::U32(256)),
            (a("embedding_length"), GValue::U32(self.hidden as u32)),
            (a("feed_forward_length"), GValue::U32(self.inter as u32)),
            (a("attention.head_count"), GValue::U32(self.heads as u32)),
            (
                a("attention.head_count_kv"),
                GValue::U32(self.kv_heads as u32),
            ),
            (a("attention.layer_norm_rms_epsilon"), GValue::F32(1e-5)),
            (a("rope.freq_base"), GValue::F32(100000.0)),
            (a("rope.dimension_count"), GValue::U32(self.head_dim as u32)),
            ("tokenizer.ggml.model".into(), GValue::String("gpt2".into())),
            ("tokenizer.ggml.pre".into(), GValue::String("smollm".into())),
            (
                "tokenizer.ggml.tokens".into(),
                GValue::Array(
                    self.tokens
                        .iter()
                        .map(|t| GValue::String(t.clone()))
                        .collect(),
                ),
            ),
            ("tokenizer.ggml.token_type".into(), GValue::Array(types)),
            (
                "tokenizer.ggml.merges".into(),
                GValue::Array(
                    [
                        "h e", "l l", "he ll", "hell o", "Ġ w", "Ġw o", "Ġwo r", "l d", "Ġwor ld",
                    ]
                    .iter()
                    .map(|m| GValue::String(m.to_string()))
                    .collect(),
                ),
            ),
            ("tokenizer.ggml.bos_token_id".into(), GValue::U32(1)),
            ("tokenizer.ggml.eos_token_id".into(), GValue::U32(0)),
            ("tokenizer.ggml.add_bos_token".into(), GValue::Bool(false)),
            (
                "tokenizer.chat_template".into(),
                GValue::String("{{ messages }}".into()),
            ),
        ]
    }

    /// Write a GGUF the way llama.cpp would: GGUF names, Q/K permuted.
    fn write(&self, path: &Path, arch: &str, extra: &[(&str, Tensor)]) {
        self.write_md(path, &self.metadata(arch), extra)
    }

    /// [`Self::write`] with the given metadata.
    fn write_md(&self, path: &Path, md: &[(String, GValue)], extra: &[(&str, Tensor)]) {
        let mut named: Vec<(String, QTensor)> = Vec::new();
        for (hf, t) in self.hf_weights() {
            let g = gguf_name(&hf);
            let t = if hf.contains("q_proj") {
                llama_cpp_permute(&t, self.heads)
            } else if hf.contains("k_proj") {
                llama_cpp_permute(&t, self.kv_heads)
            } else {
                t
            };
            named.push((g, QTensor::quantize(&t, GgmlDType::F32).expect("quantize")));
        }
        for (n, t) in extra {
            named.push((
                n.to_string(),
                QTensor::quantize(t, GgmlDType::F32).expect("quantize"),
            ));
        }
        let md_refs: Vec<(&str, &GValue)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let t_refs: Vec<(&str, &QTensor)> = named.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut f = std::fs::File::create(path).expect("create");
        gguf_file::write(&mut f, &md_refs, &t_refs).expect("write gguf");
    }
}

fn byte_sym(b: u8) -> char {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable(b) {
        char::from(b)
    } else {
        char::from_u32(256 + (0..b).filter(|&x| !printable(x)).count() as u32).expect("char")
    }
}

fn gguf_name(hf: &str) -> String {
    let map = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, g)) = map.iter().find(|(h, _)| *h == hf) {
        return g.to_string();
    }
    let rest = hf.strip_prefix("model.layers.").expect("layer name");
    let (l, rest) = rest.split_once('.').expect("layer");
    let m = [
        ("input_layernorm", "attn_norm"),
        ("post_attention_layernorm", "ffn_norm"),
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
    ];
    let (module, kind) = rest.rsplit_once('.').expect("kind");
    let g = m
        .iter()
        .find(|(h, _)| *h == module)
        .expect("known module")
        .1;
    format!("blk.{l}.{g}.{kind}")
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f32>())
        .expect("diff")
}

#[test]
fn names_map_both_ways() {
    assert_eq!(
        hf_name("token_embd.weight").as_deref(),
        Some("model.embed_tokens.weight")
    );
    assert_eq!(
        hf_name("blk.17.attn_output.weight").as_deref(),
        Some("model.layers.17.self_attn.o_proj.weight")
    );
    assert_eq!(
        hf_name("blk.0.attn_q.bias").as_deref(),
        Some("model.layers.0.self_attn.q_proj.bias")
    );
    assert_eq!(
        hf_name("blk.3.ffn_norm.weight").as_deref(),
        Some("model.layers.3.post_attention_layernorm.weight")
    );
    assert_eq!(hf_name("blk.x.attn_q.weight"), None);
    assert_eq!(hf_name("blk.0.ffn_gate_exps.weight"), None);
    assert_eq!(hf_name("rope_freqs.weight"), None);
    // Export's direction: the inverse, on every HF name of a tiny model,
    // against this file's own table; norms have no bias.
    for (hf, _) in Tiny::new().hf_weights() {
        let g = xtf_train::model::gguf::gguf_name(&hf);
        assert_eq!(g.as_deref(), Some(gguf_name(&hf).as_str()), "{hf}");
        assert_eq!(hf_name(&g.unwrap()).as_deref(), Some(hf.as_str()));
    }
    assert_eq!(
        xtf_train::model::gguf::gguf_name("model.layers.2.self_attn.k_norm.weight").as_deref(),
        Some("blk.2.attn_k_norm.weight")
    );
    assert_eq!(
        xtf_train::model::gguf::gguf_name("model.layers.0.input_layernorm.bias"),
        None
    );
}

#[test]
fn unpermute_inverts_llama_cpp_permute() {
    for (heads, hd, cols) in [(9usize, 64usize, 5usize), (3, 64, 1), (2, 4, 3)] {
        let rows = heads * hd;
        let data: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
        let w = Tensor::from_vec(data, (rows, cols), &Device::Cpu).expect("t");
        let back = unpermute_qk(&llama_cpp_permute(&w, heads), heads).expect("unpermute");
        assert_eq!(max_diff(&w, &back), 0.0);
        // Not the identity: the test would otherwise prove nothing.
        assert!(max_diff(&w, &llama_cpp_permute(&w, heads)) > 0.0);
        // Biases (1-D) too.
        let b = Tensor::arange(0f32, rows as f32, &Device::Cpu).expect("b");
        let back = unpermute_qk(&llama_cpp_permute(&b, heads), heads).expect("bias");
        assert_eq!(max_diff(&b, &back), 0.0);
    }
    assert!(unpermute_qk(
        &Tensor::zeros((6, 2), DType::F32, &Device::Cpu).expect("z"),
        4
    )
    .is_err());
}

#[test]
fn merges_from_scores_orders_like_transformers() {
    // Score order decides; ties fall back to piece lengths (descending), then vocabulary order.
    let tokens = ["a", "b", "c", "ab", "bc", "abc"];
    let scores = [0.0, 0.0, 0.0, -1.0, -2.0, -3.0];
    let m = merges_from_scores(&tokens, &scores);
    let m: Vec<(&str, &str)> = m.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    assert_eq!(m, vec![("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc")]);
}

#[test]
fn tiny_llama_converts_and_unpermutes() {
    let dir = scratch("tiny");
    let tiny = Tiny::new();
    let path = dir.join("tiny.gguf");
    tiny.write(&path, "llama", &[]);
    let out = dir.join("hf");
    let s = convert(&path, &out, DType::F32).expect("convert");
    assert_eq!(s.tensors, 2 + 9 * tiny.layers);
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).expect("read"))
            .expect("json");
    assert_eq!(cfg["model_type"], "llama");
    assert_eq!(cfg["num_key_value_heads"], 1);
    assert_eq!(cfg["head_dim"], 4);
    assert_eq!(cfg["tie_word_embeddings"], true);
    assert_eq!(cfg["rms_norm_eps"], 1e-5);
    assert_eq!(cfg["vocab_size"], tiny.vocab());
    assert_eq!(cfg["bos_token_id"], 1);
    assert!(cfg["rope_scaling"].is_null());

    let got =
        candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).expect("load");
    for (name, want) in tiny.hf_weights() {
        let g = got.get(&name).unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(max_diff(g, &want), 0.0, "{name} differs");
    }
    assert!(!got.contains_key("lm_head.weight"));

    let tc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("tokenizer_config.json")).expect("read"),
    )
    .expect("json");
    assert_eq!(tc["add_bos_token"], false);
    assert_eq!(tc["bos_token"], "<|im_start|>");
    assert_eq!(tc["eos_token"], "<|endoftext|>");
    assert_eq!(tc["chat_template"], "{{ messages }}");

    let tok = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).expect("tokenizer");
    let ids = tok
        .encode("<|im_start|>hello world 42", false)
        .expect("encode")
        .get_ids()
        .to_vec();
    let toks: Vec<String> = ids
        .iter()
        .map(|i| tok.id_to_token(*i).unwrap_or_default())
        .collect();
    assert_eq!(toks, ["<|im_start|>", "hello", "Ġworld", "Ġ", "4", "2"]);
    assert_eq!(
        tok.decode(&ids, false).expect("decode"),
        "<|im_start|>hello world 42"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn f16_and_bf16_outputs() {
    let dir = scratch("dtypes");
    let tiny = Tiny::new();
    let path = dir.join("tiny.gguf");
    tiny.write(&path, "llama", &[]);
    for (dt, name) in [(DType::F16, "float16"), (DType::BF16, "bfloat16")] {
        let out = dir.join(name);
        convert(&path, &out, dt).expect("convert");
        let got = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu)
            .expect("load");
        assert_eq!(got["model.norm.weight"].dtype(), dt);
        let cfg = std::fs::read_to_string(out.join("config.json")).expect("read");
        assert!(cfg.contains(name));
    }
    assert!(matches!(
        convert(&path, &dir.join("u8"), DType::U8),
        Err(GgufError::Dtype(_))
    ));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn errors_are_typed_and_name_the_file() {
    let dir = scratch("errors");
    let tiny = Tiny::new();
    let good = dir.join("good.gguf");
    tiny.write(&good, "llama", &[]);
    let bytes = std::fs::read(&good).expect("read");

    // Not a GGUF at all.
    let junk = dir.join("junk.gguf");
    std::fs::write(&junk, b"this is not a gguf file, just text").expect("w");
    let e = GgufFile::open(&junk).expect_err("junk");
    assert!(matches!(e, GgufError::NotGguf { .. }), "{e}");
    assert!(e.to_string().contains("junk.gguf"), "{e}");

    // Missing file.
    let e = GgufFile::open(&dir.join("nope.gguf")).expect_err("missing");
    assert!(matches!(e, GgufError::Io { .. }), "{e}");

    // Empty file and a header cut short.
    for (name, len) in [("empty.gguf", 0usize), ("head.gguf", 100)] {
        let p = dir.join(name);
        std::fs::write(&p, &bytes[..len]).expect("w");
        let e = GgufFile::open(&p).expect_err(name);
        assert!(matches!(e, GgufError::Truncated { .. }), "{name}: {e}");
    }

    // Tensor data cut short: caught at open, naming a tensor.
    let cut = dir.join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() - 10]).expect("w");
    let e = GgufFile::open(&cut).expect_err("cut");
    assert!(matches!(e, GgufError::Truncated { .. }), "{e}");
    assert!(e.to_string().contains("tensor"), "{e}");

    // Unknown architecture.
    let arch = dir.join("arch.gguf");
    tiny.write(&arch, "gpt2", &[]);
    let e = GgufFile::open(&arch).expect_err("arch");
    assert!(
        matches!(&e, GgufError::UnsupportedArchitecture { arch, .. } if arch == "gpt2"),
        "{e}"
    );

    // A quantisation type candle lacks (IQ2_XXS = 16): patch the type id of the
    // first tensor in the header.
    let mut patched = bytes.clone();
    let name = b"token_embd.weight";
    let at = patched
        .windows(name.len())
        .position(|w| w == name)
        .expect("tensor name in header");
    let ty_at = at + name.len() + 4 + 2 * 8; // n_dims u32, two u64 dims
    patched[ty_at..ty_at + 4].copy_from_slice(&16u32.to_le_bytes());
    let q = dir.join("iq2.gguf");
    std::fs::write(&q, &patched).expect("w");
    let e = GgufFile::open(&q).expect_err("iq2");
    match &e {
        GgufError::UnsupportedQuantisation { tensor, kind, .. } => {
            assert_eq!(tensor.as_deref(), Some("token_embd.weight"));
            assert!(kind.contains("IQ2_XXS"), "{kind}");
        }
        other => panic!("wrong error {other}"),
    }

    // A tensor no dense decoder has is refused, not silently dropped.
    let extra = dir.join("extra.gguf");
    let t = Tensor::zeros(4, DType::F32, &Device::Cpu).expect("z");
    tiny.write(&extra, "llama", &[("blk.0.ffn_gate_inp.weight", t)]);
    let e = convert(&extra, &dir.join("extra"), DType::F32).expect_err("extra");
    assert!(
        matches!(&e, GgufError::Tensor { tensor, .. } if tensor == "blk.0.ffn_gate_inp.weight"),
        "{e}"
    );
    assert!(!dir.join("extra").join("config.json").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue 25: metadata that cannot describe a model is refused with the key,
/// like the other malformed files, and nothing is written.
#[test]
fn metadata_that_cannot_describe_a_model_is_refused() {
    let dir = scratch("meta");
    let tiny = Tiny::new();
    let cases = [
        ("llama.context_length", GValue::U32(0), "must be > 0"),
        (
            "llama.rope.scaling.type",
            GValue::String("yarn".into()),
            "RoPE scaling \"yarn\" is not supported",
        ),
    ];
    for (key, value, needle) in cases {
        let mut md = tiny.metadata("llama");
        md.retain(|(k, _)| k != key);
        md.push((key.to_string(), value));
        let (p, out) = (dir.join("bad.gguf"), dir.join("bad"));
        tiny.write_md(&p, &md, &[]);
        let e = convert(&p, &out, DType::F32).expect_err(key);
        assert!(
            matches!(&e, GgufError::Metadata { key: k, .. } if k == key),
            "{key}: {e}"
        );
        assert!(
            e.to_string().contains(needle) && e.to_string().contains("bad.gguf"),
            "{e}"
        );
        assert!(!out.join("config.json").exists(), "{key}: wrote a config");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn unsupported_tokenizer_kinds_are_errors() {
    let dir = scratch("tok");
    let tiny = Tiny::new();
    let base = tiny.metadata("llama");
    let tensors: Vec<(String, QTensor)> = {
        let mut v = Vec::new();
        for (hf, t) in tiny.hf_weights() {
            v.push((
                gguf_name(&hf),
                QTensor::quantize(&t, GgmlDType::F32).expect("q"),
            ));
        }
        v
    };
    for (key, value, needle) in [
        (
            "tokenizer.ggml.model",
            "bert",
            "unsupported tokenizer.ggml.model",
        ),
        (
            "tokenizer.ggml.pre",
            "mystery-pre",
            "unsupported tokenizer.ggml.pre",
        ),
    ] {
        let md: Vec<(String, GValue)> = base
            .iter()
            .map(|(k, v)| {
                if k == key {
                    (k.clone(), GValue::String(value.into()))
                } else {
                    (k.clone(), v.clone())
                }
            })
            .collect();
        let md_refs: Vec<(&str, &GValue)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let p = dir.join(format!("{value}.gguf"));
        let mut f = std::fs::File::create(&p).expect("create");
        gguf_file::write(&mut f, &md_refs, &t_refs).expect("write");
        let g = GgufFile::open(&p).expect("opens: the tokenizer is checked lazily");
        let e = g.tokenizer().expect_err(value);
        assert!(
            matches!(e, GgufError::Tokenizer { .. }) && e.to_string().contains(needle),
            "{e}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn smollm2_metadata_and_tokenizer() {
    let Some(path) = crate::common::smollm2_gguf() else {
        return;
    };
    let f = GgufFile::open(&path).expect("open");
    let hp = f.model_config().expect("model_config");
    assert_eq!(
        (
            hp.num_layers,
            hp.hidden_size,
            hp.num_heads,
            hp.num_kv_heads,
            hp.head_dim,
            hp.vocab_size
        ),
        (30, 576, 9, 3, 64, 49152)
    );
    assert!(hp.tie_word_embeddings);
    let cfg = f.hf_config(DType::F32).expect("config");
    assert_eq!(cfg["rms_norm_eps"], 1e-5);
    assert_eq!(cfg["rope_theta"], 100000.0);
    assert_eq!(cfg["eos_token_id"], 2);
    let tc = f.tokenizer_config().expect("tokenizer_config");
    assert_eq!(tc["bos_token"], "<|im_start|>");
    assert_eq!(tc["add_bos_token"], false);
    assert!(tc["chat_template"]
        .as_str()
        .is_some_and(|t| t.contains("<|im_start|>")));
    let tok = f.tokenizer().expect("tokenizer");
    // Digits are split one by one (Digits pre-tokenizer), specials stay whole.
    let ids = tok
        .encode("<|im_start|>user\nWhat is 123+45?<|im_end|>", false)
        .expect("encode")
        .get_ids()
        .to_vec();
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(ids.last(), Some(&2));
    let toks: Vec<String> = ids.iter().filter_map(|i| tok.id_to_token(*i)).collect();
    assert!(toks.windows(3).any(|w| w == ["1", "2", "3"]), "{toks:?}");
}

#[test]
fn smollm2_full_conversion() {
    let Some(path) = crate::common::smollm2_gguf() else {
        return;
    };
    let out = scratch("smollm");
    let s = convert(&path, &out, DType::F32).expect("convert");
    assert_eq!(s.tensors, 2 + 9 * 30);
    assert!(
        s.parameters > 130_000_000 && s.parameters < 140_000_000,
        "{}",
        s.parameters
    );
    let _ = std::fs::remove_dir_all(&out);
}

/// Logits and tokenisation of the real SmolLM2 GGUF through xtf-train's own
/// path (`model.path = "*.gguf"`: converted into the cache, loaded by our
/// decoder, tokenised by the rebuilt tokenizer with the GGUF's chat
/// template) against transformers' GGUF loader
/// (`scripts/make_gguf_fixture.py`, tests/fixtures/gguf).
#[test]
fn smollm2_logits_and_ids_match_transformers_gguf_loader() {
    let Some(path) = crate::common::smollm2_gguf() else {
        return;
    };
    // It sets XTF_CACHE: alone in its own process.
    if !crate::common::own_process("gguf::smollm2_logits_and_ids_match_transformers_gguf_loader") {
        return;
    }
    let cache = scratch("cache");
    std::env::set_var("XTF_CACHE", &cache);
    let dir = xtf_train::model::resolve_model_dir(path.to_str().unwrap(), None, DType::F32)
        .expect("converted");
    assert!(dir.starts_with(&cache));
    let model = xtf_train::model::Model::load(
        &dir,
        DType::F32,
        &Device::Cpu,
        xtf_train::model::Trainable::Frozen,
    )
    .unwrap();
    let tok = xtf_train::data::tokenizer::Tok::load(&dir).unwrap();
    // SmolLM2 names <|im_start|> as bos_token but never adds it (spec "BOS").
    assert_eq!(tok.bos, None);
    assert_eq!(tok.token_str(tok.eos), "<|im_end|>");
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fx.join("smollm2_gsm8k3.json")).unwrap())
            .unwrap();
    let r = crate::common::smollm2_fixture();
    let vocab_subset = r["vocab_subset"].to_dtype(DType::U32).unwrap();
    let mut worst = 0f32;
    for (i, prompt) in meta["prompts"].as_array().unwrap().iter().enumerate() {
        let want = crate::common::smollm2_fixture_ids(&r, i);
        // The prompts are rendered chats with their special tokens as text.
        let ids = tok
            .inner
            .encode(prompt.as_str().unwrap(), false)
            .unwrap()
            .get_ids()
            .to_vec();
        assert_eq!(ids, want, "prompt {i}: token ids");
        let x = Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = model
            .forward(&x, &mut xtf_train::model::Fwd::default(), None)
            .unwrap()
            .squeeze(0)
            .unwrap();
        let t = ids.len();
        let last = logits.get(t - 1).unwrap();
        worst = worst.max(max_diff(&last, &r[&format!("logits_last_{i}")]));
        let sub = logits.index_select(&vocab_subset, 1).unwrap();
        worst = worst.max(max_diff(&sub, &r[&format!("logits_subset_{i}")]));
    }
    assert!(worst <= 1e-4, "max |logit diff| vs transformers = {worst}");
    // Tricky strings: identical ids except where a run of whitespace stands
    // before a digit. There transformers, having no `smollm` pre-tokenizer,
    // falls back to plain GPT-2 splitting, while we split digits first as
    // llama.cpp does for `tokenizer.ggml.pre = "smollm"` (the original
    // SmolLM tokenizer's behaviour); docs/gguf.md.
    let known = ["a  1", "x\n 1", "  42", "\t7\n\n8"];
    let (mut same, mut differ) = (0, Vec::new());
    for c in meta["tricky"].as_array().unwrap() {
        let text = c["text"].as_str().unwrap();
        let want: Vec<u32> = c["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let ids = tok.inner.encode(text, false).unwrap().get_ids().to_vec();
        if ids == want {
            same += 1;
        } else {
            differ.push(text.to_string());
        }
    }
    assert!(
        differ.iter().all(|d| known.contains(&d.as_str())),
        "unexpected tokenisation differences: {differ:?}"
    );
    assert!(same >= 18, "{same} tricky strings identical");
    std::env::remove_var("XTF_CACHE");
    let _ = std::fs::remove_dir_all(&cache);
}

/// Issue 26: the first 200 GSM8K training problems as chats through our
/// data path (chat template from the GGUF, the BOS rule, prompt and response
/// tokenised apart) give the ids and `label_start` of transformers'
/// `tokenizer(apply_chat_template(...), add_special_tokens=False)` split at
/// the generation prompt (`scripts/make_gguf_fixture.py chats`), leading
/// `<|im_start|>` included. Where transformers' GGUF tokenizer and SmolLM2's
/// own pre-tokenizer disagree (chat 44: ten spaces before a digit), we match
/// SmolLM2's own rules (docs/gguf.md).
#[test]
fn smollm2_chats_match_transformers_chat_ids() {
    let Some(path) = crate::common::smollm2_gguf() else {
        return;
    };
    let train = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/gsm8k/train.jsonl");
    if !train.exists() {
        eprintln!("skipping: {} not present", train.display());
        return;
    }
    let fx = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gguf/smollm2_gsm8k_train200_chats.json");
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fx).unwrap()).unwrap();
    let f = GgufFile::open(&path).unwrap();
    let tcfg = f.tokenizer_config().unwrap();
    let tok = xtf_train::data::tokenizer::Tok::from_parts(
        f.tokenizer().unwrap(),
        Some(&tcfg),
        None,
        &path,
    )
    .unwrap();
    let chat = xtf_train::data::formats::ChatTemplate::from_tokenizer_config(&tcfg)
        .unwrap()
        .unwrap()
        .with_added_bos(tok.bos_text());
    #[derive(serde::Deserialize)]
    struct W {
        data: xtf_train::config::DataSection,
    }
    let d = toml::from_str::<W>(
        "[data]\ntrain = \"x\"\nprompt_field = \"question\"\nresponse_field = \"answer\"\n\
         chat_template = true\nlimit = 200",
    )
    .unwrap()
    .data;
    let recs = xtf_train::data::load_records(train.to_str().unwrap(), &d, Some(&chat)).unwrap();
    let (ex, stats) = xtf_train::data::tokenize(&recs, &tok, &d.template, 1 << 16).unwrap();
    assert_eq!((ex.len(), stats.truncated, stats.dropped), (200, 0, 0));
    let differ: Vec<u64> = want["differ"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    assert_eq!(
        differ,
        [44],
        "transformers' GGUF tokenizer vs SmolLM2's rules"
    );
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let im_start = tok.inner.token_to_id("<|im_start|>").unwrap();
    for (i, (e, c)) in ex.iter().zip(want["chats"].as_array().unwrap()).enumerate() {
        let sfx = if differ.contains(&(i as u64)) {
            "_original"
        } else {
            ""
        };
        assert_eq!(e.ids, ids(&c[format!("ids{sfx}")]), "chat {i}");
        assert_eq!(
            e.label_start as u64,
            c[format!("label_start{sfx}")].as_u64().unwrap(),
            "chat {i}"
        );
        assert_eq!(e.ids[0], im_start, "chat {i}");
    }
}

/// Issue 25: a conversion killed half-way leaves `.converting-*` in the
/// cache; the next conversion (under the cache's lock) removes it.
#[test]
fn conversion_removes_what_killed_conversions_left() {
    // It sets XTF_CACHE: alone in its own process.
    if !crate::common::own_process("gguf::conversion_removes_what_killed_conversions_left") {
        return;
    }
    let dir = scratch("leftover");
    let cache = dir.join("cache");
    let stale = cache.join("gguf/.converting-abc123");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("model.safetensors"), vec![0u8; 1024]).unwrap();
    let file = dir.join("tiny.gguf");
    Tiny::new().write(&file, "llama", &[]);
    std::env::set_var("XTF_CACHE", &cache);
    let out =
        xtf_train::model::resolve_model_dir(file.to_str().unwrap(), None, DType::F32).unwrap();
    assert!(out.join("model.safetensors").is_file());
    assert!(
        !stale.exists(),
        "the killed conversion's directory is still there"
    );
    let left: Vec<String> = std::fs::read_dir(cache.join("gguf"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue 24: a Qwen3 GGUF (`general.architecture = qwen3`, as llama.cpp's
/// converter writes it: Q/K rows as in HF, the per-head norms as
/// `blk.N.attn_{q,k}_norm.weight`) converts to a `qwen3` config.json and
/// the HF tensors exactly, and loads into the decoder.
#[test]
fn tiny_qwen3_converts_with_its_head_norms() {
    let dir = scratch("qwen3");
    let tiny = Tiny::new();
    let path = dir.join("qwen3.gguf");
    let mut weights = tiny.hf_weights();
    for l in 0..tiny.layers {
        for (n, k) in [("q_norm", 0.5f32), ("k_norm", 1.5)] {
            let v: Vec<f32> = (0..tiny.head_dim).map(|i| k + i as f32 * 0.1).collect();
            let t = Tensor::from_vec(v, tiny.head_dim, &Device::Cpu).unwrap();
            weights.push((format!("model.layers.{l}.self_attn.{n}.weight"), t));
        }
    }
    let named: Vec<(String, QTensor)> = weights
        .iter()
        .map(|(hf, t)| {
            let g = match hf.rsplit_once(".self_attn.") {
                Some((p, n)) if n.ends_with("_norm.weight") => {
                    format!("blk.{}.attn_{}", p.trim_start_matches("model.layers."), n)
                }
                _ => gguf_name(hf),
            };
            (g, QTensor::quantize(t, GgmlDType::F32).unwrap())
        })
        .collect();
    let md = tiny.metadata("qwen3");
    let md_refs: Vec<(&str, &GValue)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = named.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(
        &mut std::fs::File::create(&path).unwrap(),
        &md_refs,
        &t_refs,
    )
    .unwrap();
    let out = dir.join("hf");
    let s = convert(&path, &out, DType::F32).expect("convert");
    assert_eq!(s.tensors, 2 + 11 * tiny.layers);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model_type"], "qwen3");
    assert_eq!(cfg["architectures"][0], "Qwen3ForCausalLM");
    assert_eq!(cfg["attention_bias"], false);
    let got = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    for (name, want) in &weights {
        let g = got.get(name).unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(
            max_diff(g, want),
            0.0,
            "{name} differs (qwen3 is not Q/K-permuted)"
        );
    }
    let m = xtf_train::model::Model::load(
        &out,
        DType::F32,
        &Device::Cpu,
        xtf_train::model::Trainable::Frozen,
    )
    .expect("loads");
    assert_eq!(m.cfg.family, xtf_train::model::Family::Qwen3);
    let _ = std::fs::remove_dir_all(&dir);
}
