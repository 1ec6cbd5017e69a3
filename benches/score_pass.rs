//! XTF scoring-pass cost relative to a plain forward pass of the same batch
//! (the budget: about 1.5x). Both run interleaved in one process so
//! machine noise hits them alike; prints one JSON line per model size.
//!
//!     cargo bench --bench score_pass [-- --reps 5]

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use std::time::Instant;
use xtf_train::config::{Distance, RiReduce};
use xtf_train::data::{make_batch, Example};
use xtf_train::model::Fwd;
use xtf_train::model::{Model, ModelConfig, Trainable};
use xtf_train::xtf::score::{score_batch, ScoreOptions};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> xtf_train::Result<()> {
    xtf_train::io::keep_freed_pages();
    let args: Vec<String> = std::env::args().collect();
    let reps: usize = args
        .iter()
        .position(|a| a == "--reps")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    for (name, hidden, inter, layers, heads, vocab, batch, seq) in [
        ("tiny", 128, 352, 4, 4, 512, 16, 160),
        ("bench", 512, 1376, 4, 8, 2048, 4, 256),
    ] {
        let cfg = ModelConfig::from_json(
            &serde_json::json!({"model_type": "llama", "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter,
                "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": heads, "rms_norm_eps": 1e-6}),
            std::path::Path::new("bench"),
        )?;
        let w = xtf_train::model::random_weights(&cfg, 0)?;
        let model = Model::from_tensors(
            cfg,
            w,
            DType::F32,
            &Device::Cpu,
            Trainable::Frozen,
            std::path::Path::new("bench"),
        )?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let ex: Vec<Example> = (0..batch)
            .map(|_| Example {
                ids: (0..seq).map(|_| rng.gen_range(0..vocab as u32)).collect(),
                label_start: seq / 3,
            })
            .collect();
        let refs: Vec<&Example> = ex.iter().collect();
        let b = make_batch(&refs, None, 0, &Device::Cpu)?;
        let opts = ScoreOptions {
            reduce: RiReduce::ReceivedMean,
            layers: (0..layers).collect(),
            distance: Distance::Cosine,
            embedding: xtf_train::config::TrEmbedding::Input,
            domain_words: None,
            batch_size: batch,
        };
        let forward = |ids: &Tensor| -> xtf_train::Result<f64> {
            let t = Instant::now();
            let logits = model.forward(ids, &mut Fwd::default(), None)?;
            logits.sum_all()?.to_scalar::<f32>()?;
            Ok(t.elapsed().as_secs_f64())
        };
        let score = || -> xtf_train::Result<f64> {
            let t = Instant::now();
            score_batch(&model, &refs, &opts)?;
            Ok(t.elapsed().as_secs_f64())
        };
        forward(&b.input)?;
        score()?;
        let (mut f, mut s) = (Vec::new(), Vec::new());
        for _ in 0..reps {
            f.push(forward(&b.input)?);
            s.push(score()?);
        }
        let (fm, sm) = (median(f), median(s));
        println!(
            "{}",
            serde_json::json!({"model": name, "batch": batch, "seq": seq, "forward_ms": fm * 1e3, "score_ms": sm * 1e3, "ratio": sm / fm})
        );
    }
    Ok(())
}
