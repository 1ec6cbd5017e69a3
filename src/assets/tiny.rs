//! `init-tiny`: the embedded offline default. A synthetic GSM8K-style dataset,
//! a byte-level BPE tokenizer trained on it, and a tiny Llama briefly
//! pre-trained on a *disjoint* synthetic corpus, so the base model already
//! predicts many tokens confidently (a random model would make the knowledge-
//! novelty filter meaningless) without having memorised the fine-tuning set.

use crate::assets::synth;
use crate::config::Schedule;
use crate::data::tokenizer::Tok;
use crate::data::{self, Example, Record};
use crate::error::{Error, Result};
use crate::model::random_weights;
use crate::model::Fwd;
use crate::model::{Model, ModelConfig, Trainable};
use crate::train;
use crate::train::optim::{lr_at, AdamW, AdamWParams};
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::path::Path;

/// Sizes of the embedded default; changing one changes every tiny artefact.
pub struct TinySpec {
    pub seed: u64,
    pub n_train: usize,
    pub n_test: usize,
    pub n_pretrain: usize,
    pub vocab_size: usize,
    pub pretrain_steps: usize,
    pub pretrain_batch: usize,
    pub pretrain_lr: f64,
}

impl Default for TinySpec {
    fn default() -> Self {
        Self {
            seed: 20260214,
            n_train: 400,
            n_test: 100,
            n_pretrain: 1200,
            vocab_size: 512,
            pretrain_steps: 240,
            pretrain_batch: 12,
            pretrain_lr: 3e-3,
        }
    }
}

/// The template `configs/tiny.toml` uses; pre-training sees the same format.
pub const TINY_TEMPLATE: &str = "Question: {prompt}\nAnswer: ";

fn tiny_config_json(vocab: usize) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": 128,
        "intermediate_size": 352,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": false,
        "attention_bias": false,
        "mlp_bias": false,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "torch_dtype": "float32",
    })
}

/// Create the tiny assets in `dir` unless they are already complete.
pub fn ensure(dir: &Path) -> Result<()> {
    let done = [
        "model/model.safetensors",
        "model/tokenizer.json",
        "data/train.jsonl",
        "data/test.jsonl",
    ];
    if done.iter().all(|f| dir.join(f).exists()) {
        return Ok(());
    }
    tracing::info!(
        "creating the embedded tiny model and data in {}",
        dir.display()
    );
    init(dir, &TinySpec::default())
}

fn write_jsonl(path: &Path, problems: &[synth::Problem]) -> Result<()> {
    let mut text = String::new();
    for p in problems {
        let line =
            serde_json::json!({"prompt": p.prompt, "response": p.response, "answer": p.answer});
        text.push_str(&line.to_string());
        text.push('\n');
    }
    crate::io::write_atomic(path, text.as_bytes())
}

/// Deterministically create `dir/data/{train,test}.jsonl` and `dir/model/`.
pub fn init(dir: &Path, spec: &TinySpec) -> Result<()> {
    let problems = synth::generate_problems(spec.n_train + spec.n_test, spec.seed);
    let (train_set, test_set) = problems.split_at(spec.n_train);
    write_jsonl(&dir.join("data/train.jsonl"), train_set)?;
    write_jsonl(&dir.join("data/test.jsonl"), test_set)?;

    // Tokenizer: trained on pre-training and fine-tuning text alike.
    // Pre-train on 8 of the 12 problem families: the fine-tuning set's other
    // four are new to the base model (something to learn, and tokens XTF's
    // knowledge-novelty filter should keep), the rest already known.
    let known: Vec<usize> = (0..8).collect();
    let pre =
        synth::generate_problems_in(spec.n_pretrain, spec.seed ^ 0x9e37_79b9_7f4a_7c15, &known);
    let texts: Vec<String> = pre
        .iter()
        .chain(&problems)
        .map(|p| format!("{}\n{}", p.prompt, p.response))
        .collect();
    let tokenizer = synth::train_tokenizer(&texts, spec.vocab_size)
        .map_err(|e| Error::Msg(format!("tokenizer training: {e}")))?;
    let mdir = dir.join("model");
    let tok_path = mdir.join("tokenizer.json");
    crate::io::write_atomic_with(&tok_path, |tmp| {
        tokenizer
            .save(tmp, false)
            .map_err(|e| Error::model(&tok_path, e))
    })?;
    let tcfg = serde_json::json!({
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
        "add_bos_token": true, "add_eos_token": false,
        "model_max_length": 1024, "tokenizer_class": "PreTrainedTokenizerFast",
    });
    crate::io::write_json(&mdir.join("tokenizer_config.json"), &tcfg)?;
    let vocab = tokenizer.get_vocab_size(true);
    let mcfg = tiny_config_json(vocab);
    crate::io::write_json(&mdir.join("config.json"), &mcfg)?;
    let tok = Tok::from_parts(tokenizer, Some(&tcfg), Some(&mcfg), &tok_path)?;

    // Model: seeded random init, then a short causal-LM pre-training.
    let cfg = ModelConfig::from_json(&mcfg, &mdir.join("config.json"))?;
    let weights = random_weights(&cfg, spec.seed)?;
    let model = Model::from_tensors(
        cfg,
        weights,
        DType::F32,
        &Device::Cpu,
        Trainable::Full,
        &mdir,
    )?;
    let recs: Vec<Record> = pre
        .iter()
        .map(|p| Record::pair(p.prompt.clone(), p.response.clone()))
        .collect();
    let (mut examples, _) = data::tokenize(&recs, &tok, TINY_TEMPLATE, 512)?;
    for ex in examples.iter_mut() {
        ex.label_start = 1; // language modelling: every token after BOS is a target
    }
    pretrain(&model, &examples, spec, tok.pad)?;
    let map: HashMap<String, Tensor> = model.named_tensors()?.into_iter().collect();
    // Weights last: their presence marks the directory as complete.
    crate::io::save_safetensors(&mdir.join("model.safetensors"), &map)
}

fn pretrain(model: &Model, examples: &[Example], spec: &TinySpec, pad: u32) -> Result<()> {
    let mut opt = AdamW::new(
        model.vars.clone(),
        AdamWParams {
            weight_decay: 0.01,
            ..Default::default()
        },
    )?;
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
    let mut order: Vec<usize> = Vec::new();
    let (started, mut tokens) = (std::time::Instant::now(), 0usize);
    for step in 0..spec.pretrain_steps {
        if order.len() < spec.pretrain_batch {
            let mut fresh: Vec<usize> = (0..examples.len()).collect();
            rand::seq::SliceRandom::shuffle(fresh.as_mut_slice(), &mut rng);
            order.extend(fresh);
        }
        let idx: Vec<usize> = order.drain(..spec.pretrain_batch).collect();
        let refs: Vec<&Example> = idx.iter().map(|&i| &examples[i]).collect();
        let batch = data::make_batch(&refs, None, pad, &model.device)?;
        let (loss, grads) = train::loss_step(model, &batch, batch.n_tokens, &mut Fwd::default())?;
        let mut acc = vec![None; model.vars.len()];
        train::accumulate(&mut acc, &model.vars, &grads)?;
        let lr = lr_at(
            step,
            spec.pretrain_lr,
            20,
            spec.pretrain_steps,
            Schedule::Cosine,
        );
        opt.step(&acc, lr, 1.0)?;
        tokens += batch.lengths.iter().sum::<usize>();
        if (step + 1) % 20 == 0 || step + 1 == spec.pretrain_steps {
            let secs = started.elapsed().as_secs_f64();
            let eta = secs / (step + 1) as f64 * (spec.pretrain_steps - step - 1) as f64;
            tracing::info!(
                "tiny pre-training step {:>4}/{} | loss {loss:.4} | {:>6.0} tok/s | {secs:.0}s elapsed, ETA {eta:.0}s",
                step + 1,
                spec.pretrain_steps,
                tokens as f64 / secs,
            );
        }
    }
    Ok(())
}
