//! TEMPORARY placeholder until the synth module lands.
pub struct Problem {
    pub prompt: String,
    pub response: String,
    pub answer: i64,
}
pub fn generate_problems(n: usize, seed: u64) -> Vec<Problem> {
    (0..n)
        .map(|i| {
            let a = (i as u64 * 7 + seed) % 50;
            let b = (i as u64 * 3) % 40;
            Problem {
                prompt: format!(
                    "Tom has {a} apples and buys {b} more. How many apples does he have?"
                ),
                response: format!(
                    "Tom has {a} + {b} = <<{a}+{b}={}>>{} apples.\n#### {}",
                    a + b,
                    a + b,
                    a + b
                ),
                answer: (a + b) as i64,
            }
        })
        .collect()
}
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SynthError(String);
pub fn train_tokenizer(
    texts: &[String],
    vocab_size: usize,
) -> Result<tokenizers::Tokenizer, SynthError> {
    use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::{
        normalizers::NormalizerWrapper, AddedToken, DecoderWrapper, PostProcessorWrapper,
        PreTokenizerWrapper, TokenizerBuilder,
    };
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(0)
        .special_tokens(vec![
            AddedToken::from("<pad>", true),
            AddedToken::from("<s>", true),
            AddedToken::from("</s>", true),
        ])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tok = TokenizerBuilder::<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(BPE::default())
    .with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false).into()))
    .with_decoder(Some(ByteLevel::default().into()))
    .build()
    .map_err(|e| SynthError(e.to_string()))?;
    tok.train(&mut trainer, texts.iter())
        .map_err(|e| SynthError(e.to_string()))?;
    Ok(tok.into())
}
